"""Speech-token LM (CosyVoice2 `Qwen2LM`, CosyVoice3 `CosyVoice3LM`).

Modules: `config` (`LLMConfig`), `qwen2` (backbone), `kv_cache` (per-row write index), `speech_lm`
(embeddings, head, prompt layout, params helpers incl. `fuse_qkv`), `sampling` (sampler objects
`RAS` / `Greedy` / `TopKTopP`), `decode` (`DecodeState` and the one decode loop every entry point
runs), `generate` (the public `generate`, `generate_detailed`, `generate_stream`, `generate_traced`),
`bistream` (`generate_bistream`), `slots` (fixed-size slot pool for a server: `insert` / `step` /
`release`). Import from the modules, e.g. `from cosyjax.llm.generate import generate` (nothing is
re-exported here, so the module names stay modules).
"""
