"""Helpers for the frontend tests: a small Qwen2-format tokenizer folder, tiny ONNX stand-ins for
campplus / the speech tokenizer, a torch-format `.pt` writer (no torch), synthetic wavs, tiny model folders.

Everything is generated locally (nothing is downloaded). The helpers are checked by the tests at the end.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import sys
import types
import zipfile

import numpy as np
import pytest

from tests.conftest import GOLDEN

CORPUS = [
    "Hello world, this is a test of the tokenizer. I'm fine, you're great; we've done it!",
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
    "レキシ テキ セカイ ニ オイ テ ワ、カコ ワ タンニ スギサッ タ モノ デ ワ ナイ。",
    "The quick brown fox jumps over the lazy dog 1234567890 times.\n\nNew paragraph here.",
    "八百标兵奔北坡，北坡炮兵并排跑，炮兵怕把标兵碰，标兵怕碰炮兵炮。",
    "You are a helpful assistant. Please say a sentence as loudly as possible.",
]

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def write_blank_en(path: str, pad_to: int | None = None, extra_added: tuple = (), declared_ids: list | None = None) -> str:
    """Write vocab.json / merges.txt / tokenizer_config.json in the Qwen2 format: a byte-level BPE trained
    on CORPUS (all 256 byte symbols present), optionally padded with filler entries to `pad_to` tokens,
    with <|endoftext|>, <|im_start|>, <|im_end|> (+ `extra_added`) declared as added tokens."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    if pad_to:
        i = len(vocab)
        while len(vocab) < pad_to:
            vocab[f"<filler_{i}>"] = len(vocab)
            i += 1
    n = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_added]
    ids = declared_ids or [n + i for i in range(len(names))]
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, c in zip(ids, names)},
        "additional_special_tokens": [t for t in names if t != "<|endoftext|>"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    return path


# ----------------------------------------------------------------------------------------- ONNX stand-ins
CAMPPLUS_DIM = 192


def campplus_weight() -> np.ndarray:
    return np.random.RandomState(7).randn(80, CAMPPLUS_DIM).astype(np.float32) * 0.1


def write_campplus(path: str, n_inputs: int = 1) -> str:
    """input 'input' float32 [1, T, 80] -> output 'embedding' = mean_T(input) @ W, float32 [1, 192]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])]
    if n_inputs == 2:
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["embedding"])]
    graph = helper.make_graph(nodes, "campplus_standin", inputs,
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, CAMPPLUS_DIM])],
                              initializer=[numpy_helper.from_array(campplus_weight(), "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def expected_campplus(fbank_cmn: np.ndarray) -> np.ndarray:
    return (fbank_cmn.astype(np.float32).mean(0, keepdims=True) @ campplus_weight()).astype(np.float32)


def write_speech_tokenizer(path: str) -> str:
    """inputs 'feats' float32 [1, 128, T], 'feats_length' int32 [1] -> 'indices' int64 [1, ceil(T/4)] =
    (floor(|mean_mel(feats[:, :, ::4])| * 1000) + feats_length) mod 6561."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array
    inits = [c(np.array([0], np.int64), "starts"), c(np.array([1 << 30], np.int64), "ends"),
             c(np.array([2], np.int64), "axes"), c(np.array([4], np.int64), "steps"),
             c(np.array(1000.0, np.float32), "k"), c(np.array(6561, np.int64), "vocab")]
    nodes = [
        helper.make_node("Slice", ["feats", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("ReduceMean", ["s"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Abs", ["m"], ["a"]),
        helper.make_node("Mul", ["a", "k"], ["b"]),
        helper.make_node("Floor", ["b"], ["f"]),
        helper.make_node("Cast", ["f"], ["fi"], to=TensorProto.INT64),
        helper.make_node("Cast", ["feats_length"], ["li"], to=TensorProto.INT64),
        helper.make_node("Add", ["fi", "li"], ["t"]),
        helper.make_node("Mod", ["t", "vocab"], ["indices"]),
    ]
    graph = helper.make_graph(
        nodes, "speech_tokenizer_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "L"])], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def expected_speech_tokens(log_mel: np.ndarray) -> np.ndarray:
    s = log_mel[:, :, ::4].astype(np.float32).mean(axis=1, dtype=np.float32)
    t = np.floor(np.abs(s) * np.float32(1000.0)).astype(np.int64) + log_mel.shape[2]
    return (t % 6561).astype(np.int32)


# ----------------------------------------------------------------------------------------- torch .pt writer
def write_torch_pickle(path: str, tree) -> str:
    """Write `tree` (dicts/lists of numpy arrays and scalars) as torch.save would (zip + pickle protocol 2),
    without torch: tensors become `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, {})`."""
    storage_names = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int32): "IntStorage",
                     np.dtype(np.int64): "LongStorage", np.dtype(np.float64): "DoubleStorage"}
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")
    classes = {}
    for name in storage_names.values():
        cls = type(name, (), {"__module__": "torch"})
        setattr(fake_torch, name, cls)
        classes[name] = cls

    def _rebuild_tensor_v2(*args):  # placeholder; only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    fake_torch._utils = fake_utils
    blobs: list[np.ndarray] = []

    class Storage:
        def __init__(self, arr):
            self.arr, self.key = arr, str(len(blobs))
            blobs.append(arr)

    class Tensor:
        def __init__(self, arr):
            self.arr = np.ascontiguousarray(arr)

        def __reduce__(self):
            a = self.arr
            stride = tuple(s // a.itemsize for s in a.strides) if a.ndim else ()
            return (_rebuild_tensor_v2, (Storage(a.reshape(-1)), 0, a.shape, stride, False,
                                         collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", classes[storage_names[obj.arr.dtype]], obj.key, "cpu", obj.arr.size)
            return None

    def wrap(x):
        if isinstance(x, dict):
            return {k: wrap(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return Tensor(x)
        return x

    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
    try:
        buf = io.BytesIO()
        P(buf, protocol=2).dump(wrap(tree))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for i, arr in enumerate(blobs):
            zf.writestr(f"archive/data/{i}", arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    return path


# ----------------------------------------------------------------------------------------- audio
def speech_like(seconds: float, rate: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Deterministic voiced-ish test signal [N] (or [N, channels]) in [-0.5, 0.5]."""
    rng = np.random.RandomState(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t))
    x = 0.25 * x / np.max(np.abs(x)) + 0.01 * rng.randn(t.size)
    if channels > 1:
        x = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return x.astype(np.float32)


def write_wav(path: str, samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> str:
    import soundfile as sf

    sf.write(path, samples, rate, subtype=subtype)
    return path


# ----------------------------------------------------------------------------------------- model folders
def make_model_dir(root: str, version: str, blank_en_src: str | None = None, onnx: bool = True) -> str:
    """A model folder: the golden tiny yaml + a tokenizer folder (copied) + ONNX stand-ins (no weights)."""
    d = os.path.join(root, version)
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(GOLDEN, version, "modeldir", f"{version}.yaml"), d)
    if blank_en_src:
        shutil.copytree(blank_en_src, os.path.join(d, "CosyVoice-BlankEN"), dirs_exist_ok=True)
    if onnx:
        write_campplus(os.path.join(d, "campplus.onnx"))
        write_speech_tokenizer(os.path.join(d, f"speech_tokenizer_v{version[-1]}.onnx"))
    return d


@pytest.fixture(scope="session")
def blank_en(tmp_path_factory) -> str:
    """A small Qwen2-format tokenizer folder (base vocabulary of a few hundred tokens)."""
    return write_blank_en(str(tmp_path_factory.mktemp("blank_en_small")))


@pytest.fixture(scope="session")
def onnx_available():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    return True


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, blank_en, onnx_available) -> dict:
    """{'cosyvoice2': dir, 'cosyvoice3': dir} with tokenizer + ONNX stand-ins."""
    root = str(tmp_path_factory.mktemp("modeldirs"))
    return {v: make_model_dir(root, v, blank_en) for v in ("cosyvoice2", "cosyvoice3")}


# ----------------------------------------------------------------------------------------- helper self-tests
def test_torch_pickle_writer_roundtrip(tmp_path):
    from cosyjax.io.torch_checkpoint import load_pickle_tree

    tree = {"spk": {"embedding": np.arange(6, dtype=np.float32).reshape(1, 6),
                    "tokens": np.array([[3, 4, 5]], np.int32), "len": np.array([3], np.int32)}}
    got = load_pickle_tree(write_torch_pickle(str(tmp_path / "x.pt"), tree))
    assert set(got) == {"spk"} and set(got["spk"]) == {"embedding", "tokens", "len"}
    for k, v in tree["spk"].items():
        assert got["spk"][k].dtype == v.dtype and np.array_equal(got["spk"][k], v)


def test_speech_like_is_deterministic_and_bounded():
    a, b = speech_like(0.5, 16000, seed=3), speech_like(0.5, 16000, seed=3)
    assert a.shape == (8000,) and np.array_equal(a, b) and np.max(np.abs(a)) < 0.5
    assert speech_like(0.2, 8000, channels=2).shape == (1600, 2)
