"""HiFT parity: `<version>/hift/inference.npz` (upstream `hift.inference(mel)`, float32 CPU).

Weights go through the normal converter (`ctx.params('hift')`); the recorded randomness is injected
(CV2: the Gaussian `sinegen_noise` and `sinegen_rand_ini` drawn at the call; CV3: the construction-time
uniform buffer `sinegen_uniform_noise`). Every size comes from the model folder and the fixture shapes.

CV3 runs end to end (its float64 f0 predictor reproduces upstream's f0 bit for bit), including the
streaming `finalize=False` outputs when the fixture has them.
CV2's f0 predictor is float32 upstream; its rounding noise (~1e-6 relative, as far from a float64
evaluation as from ours) is amplified by the unwrapped harmonic phase (cumsum x 2pi x 480, ~1e3 rad),
so the stage-by-stage rows feed the recorded f0 to the source (note "recorded f0"), and the
end-to-end rows ("[own f0]") check source, source STFT, conv_post_out and wav from our own f0 at the same
tolerance, except `source_stft_imag [own f0]` (TOL_OWN_F0_STFT_IMAG, measured reason below).
"""
from __future__ import annotations

import numpy as np

from cosyjax.parity.core import FixtureContext, Result, compare

TOL = 1e-4
PER_VERSION = True
# CV2 own-f0 `source_stft_imag`: measured rel-L2 1.07e-4 (max-abs 5.5e-5; 1.7e-6 from the recorded f0). Our f0
# differs from upstream's float32 f0 by rounding (~1e-6 relative); the harmonic phase sum (cumsum x 2pi x 480,
# ~1e3 rad) amplifies that to the same absolute STFT error in both parts (real: 2.1e-5 rel), but the imag part's
# norm is 1/38 of the real part's, so the same error reads ~5x larger relative to it. 2e-4 = 1.9x the measured
# value; every other own-f0 row keeps TOL.
TOL_OWN_F0_STFT_IMAG = 2e-4
UNUSED = {"inference.npz": {
    "source_noise_unused": "CV2 SourceModuleHnNSF noise-branch draw that upstream inference() discards",
    "source_uv_uniform_unused": "CV3 noise-branch draw that upstream inference() discards",
}}


def _rows(version, got_wav, got_src, ex, z, suffix="", note="", tol_imag=TOL, note_imag=""):
    out = [
        compare(version, "hift", "source" + suffix, got_src[:, None, :], z["source"], TOL, note),
        compare(version, "hift", "source_stft_real" + suffix,
                np.asarray(ex["source_stft"])[..., : z["source_stft_real"].shape[1]].transpose(0, 2, 1),
                z["source_stft_real"], TOL, note),
        compare(version, "hift", "source_stft_imag" + suffix,
                np.asarray(ex["source_stft"])[..., z["source_stft_real"].shape[1]:].transpose(0, 2, 1),
                z["source_stft_imag"], tol_imag, note_imag or note),
        compare(version, "hift", "conv_post_out" + suffix, np.asarray(ex["conv_post_out"]).transpose(0, 2, 1),
                z["conv_post_out"], TOL, note),
        compare(version, "hift", "wav" + suffix, got_wav, z["wav"], TOL, note),
    ]
    return out


def check(ctx: FixtureContext) -> list[Result]:
    if not ctx.has("hift", "inference.npz"):
        return []
    from cosyjax.hift.config import HiFTConfig
    from cosyjax.hift.vocoder import hift_inference

    v = ctx.version
    z = ctx.npz("hift", "inference.npz")
    cfg = HiFTConfig.from_model_config(ctx.model_config)
    params = ctx.params("hift")
    mel = np.ascontiguousarray(z["mel"].transpose(0, 2, 1))  # upstream [B, 80, T] -> [B, T, 80]
    noise = z["sinegen_uniform_noise"] if cfg.causal else z["sinegen_noise"]
    rand_ini = z.get("sinegen_rand_ini")
    run = dict(noise=noise, rand_ini=rand_ini, return_intermediates=True)

    wav, src, ex = hift_inference(params, cfg, mel, **run)
    wav, src = np.asarray(wav), np.asarray(src)
    rows = [compare(v, "hift", "f0", np.asarray(ex["f0"]), z["f0"], TOL,
                    "float64 predictor" if cfg.causal else "")]
    if cfg.causal:
        rows += _rows(v, wav, src, ex, z)
        if "wav_finalize_false" in z:
            wav_ff, src_ff = hift_inference(params, cfg, mel, noise=noise, rand_ini=rand_ini, finalize=False)
            rows.append(compare(v, "hift", "wav_finalize_false", np.asarray(wav_ff), z["wav_finalize_false"], TOL))
            rows.append(compare(v, "hift", "source_finalize_false", np.asarray(src_ff)[:, None, :],
                                z["source_finalize_false"], TOL))
        return rows
    f0_rec = z["f0"].astype(np.float32)
    wav_s, src_s, ex_s = hift_inference(params, cfg, mel, f0=f0_rec, **run)
    rows += _rows(v, np.asarray(wav_s), np.asarray(src_s), ex_s, z, note="recorded f0")
    rows += _rows(v, wav, src, ex, z, suffix=" [own f0]", note="end to end", tol_imag=TOL_OWN_F0_STFT_IMAG,
                  note_imag="end to end; own tol: f32 f0 rounding x phase sum 2pi*480, imag norm 1/38 of real")
    return rows
