"""`cosyjax serve --ray`: the same app as a Ray Serve deployment with 2 local CPU replicas behind Ray's HTTP
proxy answers the same request with the library's audio. Slow (two processes load and compile the model);
skipped only when ray[serve] is not installed."""
from __future__ import annotations

import io
import os
import socket
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'cosyjax[ray]')")
import ray  # noqa: E402
import soundfile as sf  # noqa: E402

from tests.test_serve import CV3_PREFIX, SEED, TEXT, rel_l2  # noqa: E402


@pytest.mark.slow
def test_two_ray_replicas_answer_through_the_proxy(tmp_path):
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from cosyjax.api import CosyVoice
    from cosyjax.demo import DEMO_PROMPT, DEMO_PROMPT_TEXT, build_demo_model_dir
    from cosyjax.serve.app import ServeConfig
    from cosyjax.serve.ray_app import build_deployment

    try:
        model_dir = build_demo_model_dir("cosyvoice3", out_dir=str(tmp_path / "demo"))
    except FileNotFoundError as e:
        pytest.skip(f"tiny CV3 golden model folder absent: {e}")
    cache = str(tmp_path / "cache")
    tts = CosyVoice.from_pretrained(model_dir, cache_dir=cache)  # converts once; the replicas reuse the cache
    prompt = os.path.join(model_dir, DEMO_PROMPT)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(voices=(("demo", prompt),), voices_dir=str(tmp_path / "voices"))
        serve.run(build_deployment(model_dir, config, {"cache_dir": cache}, replicas=2, gpus_per_replica=0),
                  name="cosyjax", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=900) as c:
            pids, t0 = set(), time.time()
            while len(pids) < 2 and time.time() - t0 < 120:
                pids.add(c.get("/health").json()["pid"])
            assert len(pids) == 2  # two replicas behind the one proxy
            body = {"model": "tts-1", "voice": "demo", "input": TEXT, "response_format": "wav", "seed": SEED}
            r = c.post("/v1/audio/speech", json=body)
            assert r.status_code == 200, r.text
            wav, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        ref = np.concatenate([np.asarray(o["tts_speech"]).reshape(-1) for o in tts.inference_zero_shot(
            TEXT, CV3_PREFIX + DEMO_PROMPT_TEXT, prompt, seed=SEED)])
        assert sr == 24000 and rel_l2(wav, ref) <= 1e-4
    finally:
        serve.shutdown()
        ray.shutdown()
