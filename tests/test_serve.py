"""`cosyjax serve` end to end on the tiny CosyVoice3 demo folder: a real uvicorn server on 127.0.0.1 (random
free port, in a thread), spoken to with the official `openai` client and httpx.

Outputs are compared with `cosyjax.api.CosyVoice` for the same request and seed: WAV/PCM bodies are
16-bit, so they are compared with the library's audio quantised the same way; the batching test
compares float outputs (rel-L2 <= 1e-4). Every fault of issue 12 item 5 has a test here; the last test
checks the server still answers /health.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
import soundfile as sf  # noqa: E402

from cosyjax.serve.audio import pcm16  # noqa: E402

TEXT = "Hi."
SEED = 3
CV3_PREFIX = "You are a helpful assistant.<|endofprompt|>"


class RunningServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def as_int16(audio) -> np.ndarray:
    return np.frombuffer(pcm16(audio), "<i2")


def assert_pcm_equal(got: np.ndarray, ref: np.ndarray) -> None:
    """16-bit body vs the library's float audio: same length, within 1 LSB everywhere, >= 99% bit-equal
    (float differences ~1e-6 flip a rounding now and then; a rel-L2 of 1e-4 is below 16-bit resolution)."""
    want = as_int16(ref)
    assert got.shape == want.shape, (got.shape, want.shape)
    d = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert d.max() <= 1 and np.mean(d == 0) >= 0.99, (d.max(), np.mean(d == 0))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from cosyjax.api import CosyVoice
    from cosyjax.demo import DEMO_PROMPT, DEMO_PROMPT_TEXT, build_demo_model_dir
    from cosyjax.serve.app import ServeConfig, create_app

    root = tmp_path_factory.mktemp("serve")
    try:
        model_dir = build_demo_model_dir("cosyvoice3", out_dir=str(root / "demo"))
    except FileNotFoundError as e:
        pytest.skip(f"tiny CV3 golden model folder absent: {e}")
    tts = CosyVoice.from_pretrained(model_dir, cache_dir=str(root / "cache"))
    prompt = os.path.join(model_dir, DEMO_PROMPT)
    config = ServeConfig(model_name="cosyvoice3-demo", voices_dir=str(root / "voices"), voices=(("demo", prompt),),
                         max_batch=4, batch_window_ms=300.0)
    app = create_app(tts, config)
    server = RunningServer(app)
    ctx = dict(tts=tts, app=app, config=config, url=server.url, prompt=prompt, root=root,
               prompt_text=CV3_PREFIX + DEMO_PROMPT_TEXT, client=httpx.Client(base_url=server.url, timeout=600))
    yield ctx
    ctx["client"].close()
    server.stop()


def library(env, seed=SEED, stream=False, text=TEXT):
    """What `CosyVoice` gives for the server's zero-shot request with the demo voice."""
    outs = env["tts"].inference_zero_shot(text, env["prompt_text"], env["prompt"], stream=stream, seed=seed)
    return np.concatenate([np.asarray(o["tts_speech"]).reshape(-1) for o in outs])


def openai_client(env, key="unused"):
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=key, max_retries=0, timeout=600)


def assert_error(r, status, param=None, words=""):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------- the contract
def test_openai_client_wav_equals_library(env):
    resp = openai_client(env).audio.speech.create(model="cosyvoice3-demo", voice="demo", input=TEXT,
                                                  response_format="wav", extra_body={"seed": SEED})
    wav, sr = sf.read(io.BytesIO(resp.content), dtype="float32")
    assert sr == 24000 and wav.ndim == 1
    assert rel_l2(wav, library(env)) <= 1e-4


def test_openai_client_streams_pcm_equal_to_library_stream(env):
    chunks, t0, first = [], time.perf_counter(), None
    with openai_client(env).audio.speech.with_streaming_response.create(
            model="tts-1", voice="demo", input=TEXT, response_format="pcm", extra_body={"seed": SEED}) as resp:
        assert resp.headers["content-type"].startswith("audio/pcm")
        for part in resp.iter_bytes():
            first = first or time.perf_counter() - t0
            chunks.append(part)
    got = np.frombuffer(b"".join(chunks), "<i2")
    ref = library(env, stream=True)
    assert len(chunks) >= 2  # audio arrived in pieces as chunks were produced
    assert_pcm_equal(got, ref)


def test_sse_deltas_then_done(env):
    with openai_client(env).audio.speech.with_streaming_response.create(
            model="tts-1", voice="demo", input=TEXT, response_format="pcm", stream_format="sse",
            extra_body={"seed": SEED}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"} and len(kinds) >= 3
    audio = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "<i2")
    assert_pcm_equal(audio, library(env, stream=True))


def test_concurrent_requests_are_batched_and_equal_unbatched(env):
    """3 requests at once share one batched call (bucket of 4); each equals its solo library output."""
    svc = env["app"].state.service
    seeds = [11, 12, 13]
    reqs = []
    from cosyjax.serve.speech_request import parse_speech_request

    for s in seeds:
        r = parse_speech_request({"model": "tts-1", "input": TEXT, "voice": "demo", "response_format": "wav",
                                  "seed": s}, formats=svc.formats, models=svc.models)
        reqs.append(svc.model_inputs(r, s))
    before = svc.metrics.registry.get_sample_value("cosyjax_batch_size_sum")
    futs = [svc.scheduler.submit(inputs, keys) for _, inputs, keys in reqs]
    outs = [f.result(600) for f in futs]
    assert svc.metrics.registry.get_sample_value("cosyjax_batch_size_sum") - before == 3  # one batch of the 3 (window 300 ms)
    for s, out in zip(seeds, outs):
        assert rel_l2(out, library(env, seed=s)) <= 1e-4
    # and over HTTP: concurrent requests answer 200 with the library's audio
    results = {}

    def call(s):
        results[s] = env["client"].post("/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "demo",
                                                                   "response_format": "wav", "seed": s})

    ts = [threading.Thread(target=call, args=(s,)) for s in seeds]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for s in seeds:
        wav, _ = sf.read(io.BytesIO(results[s].content), dtype="float32")
        assert rel_l2(wav, outs[seeds.index(s)]) <= 1e-4


def test_concurrent_streams_share_the_slot_decoder_and_equal_solo_streams(env):
    svc = env["app"].state.service
    assert svc.slot_streams is not None
    seeds = [21, 22]
    got = {s: [] for s in seeds}

    def call(s):
        with env["client"].stream("POST", "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "demo",
                                                                     "response_format": "pcm", "seed": s}) as r:
            for b in r.iter_bytes():
                got[s].append(b)

    steps = svc.slot_streams.steps
    ts = [threading.Thread(target=call, args=(s,)) for s in seeds]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert svc.slot_streams.steps > steps and svc.slot_streams.active() == 0
    for s in seeds:
        audio = np.frombuffer(b"".join(got[s]), "<i2")
        assert_pcm_equal(audio, library(env, seed=s, stream=True))


def test_batched_streams_equal_solo_streams(env):
    """The scheduler with a `StageGang`: 4 streams advance in threads, their flow / vocoder calls run as
    vmapped groups, and each stream's audio equals the library's own stream (rel-L2 <= 1e-4)."""
    from cosyjax.serve.batcher import Scheduler
    from cosyjax.serve.slot_streams import SlotStreams
    from cosyjax.serve.speech_request import parse_speech_request
    from cosyjax.stage_batch import StageGang

    svc = env["app"].state.service
    req = parse_speech_request({"model": "tts-1", "input": TEXT, "voice": "demo", "stream": True},
                               formats=svc.formats, models=svc.models)
    gang = StageGang()
    pool = SlotStreams(env["tts"].engine, 4, 1024, gang=gang)
    sch = Scheduler(None, pool.open, gang=gang).start()
    seeds = [31, 32, 33, 34]
    got = {s: [] for s in seeds}
    done = {s: threading.Event() for s in seeds}

    def emit_for(s):
        def emit(kind, value):
            if kind == "chunk":
                got[s].append(value)
            else:
                got[s].append(kind if value is None else value)
                done[s].set()
        return emit

    try:
        for s in seeds:
            _, inputs, keys = svc.model_inputs(req, s)
            sch.stream(inputs, keys, emit_for(s))
        assert all(done[s].wait(600) for s in seeds)
    finally:
        sch.stop()
    assert max(gang.groups) >= 2, gang.groups  # calls did run together
    # every CV3 stage batched: the chunks' flow, the final full-attention flow (equal lengths), the vocoder
    batched = {name for (name, n) in gang.stage_groups if n >= 2}
    assert {"incremental_chunk", "flow_core", "_wave_jit"} <= batched, gang.stage_groups
    for s in seeds:
        assert got[s][-1] == "done", got[s][-1]
        assert rel_l2(np.concatenate(got[s][:-1]), library(env, seed=s, stream=True)) <= 1e-4
    assert pool.active() == 0


def test_warmup_compiles_the_batched_stream_programs(env):
    """With stream batching on, `--warmup` runs 2, 4, ... lockstep streams on the service's gang."""
    from cosyjax.serve.app import ServeConfig, create_app
    from cosyjax.serve.cli import warmup

    app = create_app(env["tts"], ServeConfig(voices=(("demo", env["prompt"]),), batch_streams=True, stream_slots=2,
                                             max_batch=1))
    gang = app.state.service.gang
    assert gang is not None
    warmup(app)
    assert set(gang.groups) == {2} and gang.groups[2] >= 3  # flow chunk, f0 and wave programs, each as a pair
    # every answer length of the voice's "Hello." was compiled: any LLM output length compiles nothing new
    from cosyjax.pipeline import synthesize_rows
    from cosyjax.serve.speech_request import parse_speech_request

    svc = app.state.service
    req = parse_speech_request({"model": svc.model_name, "input": "Hello.", "voice": "demo"}, formats=svc.formats,
                               models=svc.models)
    _, inputs, keys = svc.model_inputs(req, 0)
    programs = synthesize_rows._cache_size()
    for n in (3, 40, 77, 128):
        svc.tts.engine.synthesize_batch(inputs[:1], keys[:1], tokens=[np.full(n, 7, np.int32)])
    assert synthesize_rows._cache_size() == programs
    # and every stream length: neither a stage program nor an eager op compiles (any jax compilation counts)
    compiles = []
    listen = [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if listen[0] and "backend_compile" in event else None)
    try:
        for n in (3, 40, 77, 128):
            for _ in svc.tts.engine.tts(inputs[0], stream=True, key=keys[0], tokens=np.full(n, 7, np.int32)):
                pass
    finally:
        listen[0] = False
    assert compiles == [], len(compiles)


def test_models_and_metrics(env):
    ids = [m["id"] for m in env["client"].get("/v1/models").json()["data"]]
    assert ids[0] == "cosyvoice3-demo" and "tts-1" in ids
    text = env["client"].get("/metrics").text
    for name in ("cosyjax_requests_total{", "cosyjax_request_latency_seconds_bucket", "cosyjax_batch_size_bucket",
                 "cosyjax_time_to_first_audio_seconds_bucket", "cosyjax_audio_seconds_total"):
        assert name in text, name
    assert 'route="/v1/audio/speech",status="200"' in text


# ---------------------------------------------------------------------------------------- faults
def test_bad_requests_get_openai_errors(env):
    c = env["client"]
    post = lambda body: c.post("/v1/audio/speech", json=body)  # noqa: E731
    base = {"model": "tts-1", "voice": "demo", "input": TEXT}
    assert_error(c.post("/v1/audio/speech", content=b'{"model": "tts-1", "inp', headers={"content-type":
                 "application/json"}), 400, words="malformed JSON")
    assert_error(post({**base, "input": ""}), 400, "input", "empty")
    assert_error(post({**base, "input": "a" * 4097}), 400, "input", "limit is 4096")
    assert_error(post({**base, "voice": "nobody"}), 400, "voice", "unknown voice 'nobody'")
    err = assert_error(post({**base, "response_format": "aac"}), 400, "response_format", "accepted: wav, pcm")
    assert "aac" in err["message"]
    assert_error(post({**base, "model": "gpt-99"}), 400, "model", "cosyvoice3-demo")
    assert_error(post({**base, "speed": 0.1}), 400, "speed")
    assert_error(c.get("/v1/nothing"), 404)


def test_voice_uploads(env):
    c = env["client"]
    with open(env["prompt"], "rb") as f:
        npz = f.read()
    r = c.post("/v1/audio/voices", data={"name": "carol", "ref_text": "Hello, this is the prompt voice."},
               files={"file": ("carol.npz", npz)})
    assert r.status_code == 201, r.text
    assert "carol" in [v["name"] for v in c.get("/v1/audio/voices").json()["data"]]
    # a non-audio file
    assert_error(c.post("/v1/audio/voices", data={"name": "dave"}, files={"file": ("x.txt", b"plain text, no audio")}),
                 400, "file", "not a readable audio file")
    # real audio needs the ONNX models the demo folder lacks: 501 naming them
    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000, np.float32), 16000, format="WAV")
    err = assert_error(c.post("/v1/audio/voices", data={"name": "erin"}, files={"file": ("a.wav", buf.getvalue())}),
                       501, "file", "campplus.onnx")
    assert "speech_tokenizer_v3.onnx" in err["message"]
    # names with path tricks, size limit
    assert_error(c.post("/v1/audio/voices", data={"name": "../evil"}, files={"file": ("a.npz", npz)}), 400, "name")
    big = env["config"].max_upload_bytes + 1
    assert_error(c.post("/v1/audio/voices", data={"name": "big"}, files={"file": ("a.npz", b"\0" * big)}), 413)
    # two uploads of one name at once: one wins, the other is told so
    codes = []

    def up():
        codes.append(c.post("/v1/audio/voices", data={"name": "twin"}, files={"file": ("t.npz", npz)}).status_code)

    ts = [threading.Thread(target=up) for _ in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert sorted(codes) == [201, 409]
    assert c.delete("/v1/audio/voices/twin").status_code == 200
    assert_error(c.delete("/v1/audio/voices/twin"), 404)
    assert_error(c.delete("/v1/audio/voices/demo"), 409, words="built in")


def test_voice_survives_restart_and_speaks(env):
    """A new app over the same voices folder (a restart) lists 'carol' and speaks with it."""
    from cosyjax.serve.app import create_app

    assert "carol" in [v["name"] for v in env["client"].get("/v1/audio/voices").json()["data"]]
    server = RunningServer(create_app(env["tts"], env["config"]))
    try:
        with httpx.Client(base_url=server.url, timeout=600) as c:
            assert "carol" in [v["name"] for v in c.get("/v1/audio/voices").json()["data"]]
            r = c.post("/v1/audio/speech", json={"model": "tts-1", "voice": "carol", "input": TEXT,
                                                 "response_format": "wav", "seed": SEED})
            assert r.status_code == 200 and r.headers["x-cosyjax-mode"] == "zero_shot"
            wav, _ = sf.read(io.BytesIO(r.content), dtype="float32")
            assert rel_l2(wav, library(env)) <= 1e-4  # same features and transcript as 'demo'
    finally:
        server.stop()


def test_client_disconnect_mid_stream_frees_its_work(env):
    svc = env["app"].state.service
    cancelled = svc.metrics.registry.get_sample_value("cosyjax_streams_cancelled_total")
    with env["client"].stream("POST", "/v1/audio/speech", json={"model": "tts-1", "voice": "demo",
                                                                "input": "Hi there, a longer one.", "seed": 1,
                                                                "response_format": "pcm"}) as r:
        next(r.iter_bytes())  # first audio, then hang up
    t0 = time.time()
    while (svc.scheduler.active_streams() or svc.slot_streams.active()) and time.time() - t0 < 120:
        time.sleep(0.05)
    assert svc.scheduler.active_streams() == 0 and svc.slot_streams.active() == 0
    assert svc.metrics.registry.get_sample_value("cosyjax_streams_cancelled_total") == cancelled + 1
    assert svc.slot_streams.free_count() == svc.config.stream_slots


def test_api_key(env):
    from cosyjax.serve.app import ServeConfig, create_app

    cfg = ServeConfig(voices=(("demo", env["prompt"]),), api_key="s3cret")
    server = RunningServer(create_app(env["tts"], cfg))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/health").status_code == 200  # health stays open for probes
            assert_error(c.get("/v1/models"), 401, words="API key")
            assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(c.get("/v1/models", headers={"Authorization": "s3cret"}), 401)
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop()


def test_health_after_the_fault_suite(env):
    r = env["client"].get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert 'status="400"' in env["client"].get("/metrics").text
    assert 'status="500"' not in env["client"].get("/metrics").text
