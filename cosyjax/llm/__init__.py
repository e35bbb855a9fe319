"""Speech-token LM (CosyVoice2 `Qwen2LM`, CosyVoice3 `CosyVoice3LM`): Qwen2 backbone, KV cache, sampling,
jitted generation (`generate`, `generate_stream`) and bi-streaming text input (`generate_bistream`)."""
from cosyjax.llm.bistream import LLMDecodeError, generate_bistream
from cosyjax.llm.config import LLMConfig, LLMConfigError
from cosyjax.llm.generate import Generation, generate, generate_detailed, generate_stream
from cosyjax.llm.speech_lm import LLMInputError, cast_params, filter_silent_tokens, init_params

__all__ = ["Generation", "LLMConfig", "LLMConfigError", "LLMDecodeError", "LLMInputError", "cast_params",
           "filter_silent_tokens", "generate", "generate_bistream", "generate_detailed", "generate_stream",
           "init_params"]
