"""Speech-token LM (CosyVoice2 `Qwen2LM`, CosyVoice3 `CosyVoice3LM`).

Modules: `config` (`LLMConfig`), `qwen2` (backbone), `kv_cache`, `speech_lm` (embeddings, head, prompt
layout, params helpers), `sampling` (RAS / greedy), `generate` (the public `generate`,
`generate_detailed`, `generate_stream`), `bistream` (`generate_bistream`). Import from the modules,
e.g. `from cosyjax.llm.generate import generate` (nothing is re-exported here, so the module names
stay modules).
"""
