"""Frontend: text normalisation + Qwen2 tokenizer, prompt audio, prompt features, ONNX models, model inputs.

`Frontend.from_model_dir(model_dir)` mirrors upstream's `CosyVoiceFrontEnd` (frontend_sft / zero_shot /
cross_lingual / instruct2 / vc, add_zero_shot_spk, text_normalize) with NumPy outputs. Torch-, librosa-
and scipy-free; onnxruntime (campplus / speech tokenizer) and wetext/inflect/ttsfrd are optional.
"""
from cosyjax.frontend.audio import Audio, load_audio, load_wav
from cosyjax.frontend.errors import (
    AudioError,
    AudioReadError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    FrontendError,
    MissingDependencyError,
    OnnxModelError,
    PromptFormatError,
    SampleRateError,
    SilentAudioError,
    SpeakerError,
    TokenizerFilesError,
)
from cosyjax.frontend.features import MelConfig, kaldi_fbank, prompt_mel, speaker_fbank, whisper_log_mel
from cosyjax.frontend.model_inputs import CV3_SYSTEM_PROMPT, Frontend, align_prompt
from cosyjax.frontend.prompt import PrecomputedPrompt, Prompt, PromptError
from cosyjax.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
from cosyjax.frontend.resampling import resample
from cosyjax.frontend.speakers import SpeakerStore
from cosyjax.frontend.text_normalize import TextNormalizer, split_paragraph
from cosyjax.frontend.tokenizer import TextTokenizer

__all__ = [
    "Audio", "AudioError", "AudioReadError", "AudioTooLongError", "AudioTooShortError", "CV3_SYSTEM_PROMPT",
    "EmptyAudioError", "Frontend", "FrontendError", "MelConfig", "MissingDependencyError", "OnnxModelError",
    "PrecomputedPrompt", "Prompt", "PromptError", "PromptFormatError", "SampleRateError", "SilentAudioError", "SpeakerEncoder",
    "SpeakerError", "SpeakerStore", "SpeechTokenizer", "TextNormalizer", "TextTokenizer", "TokenizerFilesError",
    "align_prompt", "kaldi_fbank", "load_audio", "load_wav", "prompt_mel", "resample", "speaker_fbank",
    "split_paragraph", "whisper_log_mel",
]
