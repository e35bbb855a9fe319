"""HiFT vocoder (CosyVoice2 `HiFTGenerator`, CosyVoice3 `CausalHiFTGenerator`): mel [B, T, 80] -> 24 kHz wav.

Modules: `config` (`HiFTConfig`), `conv` (NWC convolutions), `resblock` (Snake, ResBlock),
`f0_predictor` (+ the local `x64_enabled` context), `source` (SineGen2 + SourceModuleHnNSF, noise),
`stft` (torch-exact STFT/iSTFT), `generator` (the flax module), `vocoder` (the public
`hift_inference`, bucketed `vocode`, `vocode_padded`, `device_params`). Import from the modules,
e.g. `from cosyjax.hift.vocoder import vocode` (nothing is re-exported here).
"""
