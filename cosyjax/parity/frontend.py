"""Frontend parity: resampling, prompt mel (CV2 + CV3), Kaldi fbank (raw / CMN), whisper log-mel, mel bases.

Fixtures: `<root>/frontend/{features.npz, meta.json, *.wav}` (upstream torchaudio / matcha / whisper
outputs for upstream's two asset wavs). Each feature is computed from OUR resampled audio (the whole
chain), plus once from the fixture's own resampled audio (`from_fixture_audio`) to isolate the extractor.
The prompt-mel parameters are the yaml `feat_extractor` values recorded in meta.json; when the golden
model folders are present their yamls must give the same values.
"""
from __future__ import annotations

import json
import os

import numpy as np

from cosyjax.parity.core import Result, compare

PER_VERSION = False
DEFAULT_NPZ = "features.npz"  # meta.json's top-level "arrays" table describes this file

TOL = 1e-4
TOL_FILTERS = 1e-6

_MEL_FIELDS = ("n_fft", "num_mels", "sampling_rate", "hop_size", "win_size", "fmin", "fmax", "center")


def _mel_configs(root: str, meta: dict) -> tuple[dict, list[Result]]:
    from cosyjax.frontend.features import MelConfig

    configs, rows = {}, []
    for version, params in meta["params"]["prompt_mel"].items():
        cfg = MelConfig(**{k: params[k] for k in _MEL_FIELDS if k in params})
        model_dir = os.path.join(root, version, "modeldir")
        if os.path.isdir(model_dir):
            from cosyjax.config import ModelConfig

            ours = MelConfig.from_model_config(ModelConfig.from_dir(model_dir, need_qwen=False))
            rows.append(Result("-", "frontend", f"yaml_feat_extractor_{version}", 0.0 if ours == cfg else 1.0,
                               0.0, 0.0, ours == cfg, "" if ours == cfg else f"yaml {ours} != fixture {cfg}"))
        configs[version] = cfg
    return configs, rows


def check(ctx) -> list[Result]:
    root = os.path.join(ctx.root, "frontend")
    npz_path = os.path.join(root, "features.npz")
    if not os.path.isfile(npz_path):
        return []
    from cosyjax.frontend.audio import load_audio
    from cosyjax.frontend.features import kaldi_fbank, prompt_mel, slaney_mel_filters, speaker_fbank, whisper_log_mel

    fx = ctx.load_npz(npz_path)
    with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    mel_cfgs, rows = _mel_configs(ctx.root, meta)

    def cmp(name, got, want, tol=TOL, note=""):
        rows.append(compare("-", "frontend", name, got, want, tol, note))

    for version, cfg in mel_cfgs.items():
        key = f"mel_basis_{version}"
        if key in fx:
            cmp(key, cfg.mel_basis, fx[key], TOL_FILTERS)
    if "whisper_mel_filters_128" in fx:
        cmp("whisper_mel_filters_128", slaney_mel_filters(16000, 400, 128), fx["whisper_mel_filters_128"], TOL_FILTERS)

    tags = sorted({k.split("__")[0] for k in fx if "__" in k})
    for tag in tags:
        wav = os.path.join(root, f"{tag}.wav")
        if not os.path.isfile(wav):
            continue
        audio = load_audio(wav)
        native = int(fx.get(f"{tag}__sample_rate_native", audio.sample_rate))
        if native != audio.sample_rate:
            rows.append(Result("-", "frontend", f"{tag}__sample_rate", float("inf"), float("inf"), 0.0, False,
                               f"file rate {audio.sample_rate} != fixture {native}"))
            continue
        s16 = audio.at(16000)
        cmp(f"{tag}__speech_16k", s16, fx[f"{tag}__speech_16k"],
            note="resampled" if native != 16000 else "native")
        any_cfg = next(iter(mel_cfgs.values()), None)
        rate24 = any_cfg.sampling_rate if any_cfg is not None else 24000
        s24 = audio.at(rate24)
        if f"{tag}__speech_24k" in fx:
            cmp(f"{tag}__speech_24k", s24, fx[f"{tag}__speech_24k"], note="resampled")
        for version, cfg in mel_cfgs.items():
            key = f"{tag}__prompt_mel_{version}"
            if key in fx:
                cmp(key, prompt_mel(s24, cfg), fx[key])
        if f"{tag}__fbank_raw" in fx:
            cmp(f"{tag}__fbank_raw", kaldi_fbank(s16), fx[f"{tag}__fbank_raw"])
        if f"{tag}__fbank_cmn" in fx:
            cmp(f"{tag}__fbank_cmn", speaker_fbank(s16), fx[f"{tag}__fbank_cmn"])
        if f"{tag}__whisper_logmel128" in fx:
            cmp(f"{tag}__whisper_logmel128", whisper_log_mel(s16, n_mels=128), fx[f"{tag}__whisper_logmel128"])
        # extractors alone, on the fixture's own resampled audio
        ref16 = fx[f"{tag}__speech_16k"]
        ref24 = fx.get(f"{tag}__speech_24k", s24 if native == rate24 else None)
        if f"{tag}__fbank_cmn" in fx:
            cmp(f"{tag}__fbank_cmn(from_fixture_audio)", speaker_fbank(ref16), fx[f"{tag}__fbank_cmn"])
        if f"{tag}__whisper_logmel128" in fx:
            cmp(f"{tag}__whisper_logmel128(from_fixture_audio)", whisper_log_mel(ref16, n_mels=128),
                fx[f"{tag}__whisper_logmel128"])
        if ref24 is not None:
            for version, cfg in mel_cfgs.items():
                key = f"{tag}__prompt_mel_{version}"
                if key in fx:
                    cmp(f"{key}(from_fixture_audio)", prompt_mel(ref24, cfg), fx[key])
    return rows
