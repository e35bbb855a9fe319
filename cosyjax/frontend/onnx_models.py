"""The two ONNX models of a CosyVoice folder, run with onnxruntime exactly as upstream feeds them.

* `campplus.onnx` (CAM++ speaker encoder): input 0 = mean-normalised 80-bin Kaldi fbank, float32
  [1, frames, 80]; output 0 flattened -> the speaker embedding, float32 [1, 192].
* `speech_tokenizer_v2.onnx` / `_v3.onnx` (S3 tokenizer): input 0 = whisper log-mel float32 [1, 128, T],
  input 1 = int32 [1] holding T; output 0 flattened -> speech tokens, int32 [1, ~T/4] (25 Hz).

Inputs are addressed by position (upstream uses `session.get_inputs()[i].name`), so any export with the
same layout works. Sessions run on the CPU provider by default with graph optimisation ORT_ENABLE_ALL and
one intra-op thread (upstream's settings). onnxruntime is optional (`pip install 'cosyjax[onnx]'`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cosyjax.frontend.errors import MissingDependencyError, OnnxModelError

__all__ = ["OnnxModel", "SpeakerEncoder", "SpeechTokenizer", "import_onnxruntime", "speech_tokenizer_file"]


def import_onnxruntime():
    """Import onnxruntime or raise a `MissingDependencyError` that says how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            "onnxruntime is required to run campplus.onnx / speech_tokenizer_v*.onnx "
            "(install it with: pip install 'cosyjax[onnx]' or pip install onnxruntime)") from e
    return onnxruntime


def speech_tokenizer_file(version: str) -> str:
    """'speech_tokenizer_v2.onnx' (CosyVoice2) or 'speech_tokenizer_v3.onnx' (CosyVoice3)."""
    names = {"cosyvoice2": "speech_tokenizer_v2.onnx", "cosyvoice3": "speech_tokenizer_v3.onnx"}
    if version not in names:
        raise ValueError(f"unknown model version {version!r}")
    return names[version]


class OnnxModel:
    """An onnxruntime session with upstream's options; `n_inputs` checked at load time."""

    kind = "onnx model"
    n_inputs = 1

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 intra_op_num_threads: int = 1):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise OnnxModelError(f"{self.kind} not found: {path}")
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_num_threads
        try:
            self.session = ort.InferenceSession(path, sess_options=options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own exception types
            raise OnnxModelError(f"cannot load {self.kind} {path}: {e}") from e
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.input_names) != self.n_inputs:
            raise OnnxModelError(
                f"{path}: a {self.kind} takes {self.n_inputs} input(s), this model has {len(self.input_names)} "
                f"({', '.join(self.input_names)})")
        if not self.session.get_outputs():
            raise OnnxModelError(f"{path}: the model has no outputs")

    def _run(self, feeds: dict) -> np.ndarray:
        try:
            return self.session.run(None, feeds)[0]
        except Exception as e:
            shapes = {k: (v.shape, str(v.dtype)) for k, v in feeds.items()}
            raise OnnxModelError(f"{self.path}: {self.kind} failed on inputs {shapes}: {e}") from e


class SpeakerEncoder(OnnxModel):
    """campplus.onnx: `__call__(fbank_cmn [frames, 80]) -> float32 [1, D]` (D = 192).

    An `Audio` is accepted too: its 16 kHz version goes through `features.speaker_fbank` first.
    """

    kind = "speaker encoder (campplus.onnx)"
    n_inputs = 1

    def __call__(self, fbank_cmn) -> np.ndarray:
        from cosyjax.frontend.audio import Audio

        if isinstance(fbank_cmn, Audio):
            from cosyjax.frontend.features import speaker_fbank

            fbank_cmn = speaker_fbank(fbank_cmn.at(16000))
        feat = np.asarray(fbank_cmn, dtype=np.float32)
        if feat.ndim != 2:
            raise ValueError(f"speaker encoder expects a fbank [frames, bins], got shape {feat.shape}")
        out = self._run({self.input_names[0]: feat[None]})
        return np.asarray(out, dtype=np.float32).reshape(1, -1)


class SpeechTokenizer(OnnxModel):
    """speech_tokenizer_v2/v3.onnx: `__call__(log_mel [1, 128, T]) -> int32 [1, L]` speech tokens.

    An `Audio` is accepted too: its 16 kHz version goes through `features.whisper_log_mel` first.
    """

    kind = "speech tokenizer (speech_tokenizer_v*.onnx)"
    n_inputs = 2

    def __call__(self, log_mel) -> np.ndarray:
        from cosyjax.frontend.audio import Audio

        if isinstance(log_mel, Audio):
            from cosyjax.frontend.features import whisper_log_mel

            log_mel = whisper_log_mel(log_mel.at(16000), n_mels=128)
        feat = np.asarray(log_mel, dtype=np.float32)
        if feat.ndim != 3 or feat.shape[0] != 1:
            raise ValueError(f"speech tokenizer expects a log-mel [1, n_mels, T], got shape {feat.shape}")
        out = self._run({self.input_names[0]: feat,
                         self.input_names[1]: np.array([feat.shape[2]], dtype=np.int32)})
        return np.asarray(out).reshape(1, -1).astype(np.int32)
