"""`cosyjax.serve` parts that need no model: request validation, audio encoders, the voice store and the
batching scheduler (with stand-in engine functions that record what they were given)."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from cosyjax.errors import CosyJaxError
from cosyjax.prompt import Prompt
from cosyjax.serve.audio import decode_upload, encodable_formats, encode, float32_le, pcm16, wav_stream_header
from cosyjax.serve.batcher import BatchConfig, Scheduler, batch_bucket
from cosyjax.serve.errors import ServeError
from cosyjax.serve.speech_request import Limits, parse_speech_request
from cosyjax.serve.voices import VoiceStore, check_voice_name

FORMATS = ("wav", "pcm", "flac", "mp3", "opus")
MODELS = ("m",)


def _req(**kw):
    d = {"model": "m", "input": "hello", "voice": "v", **kw}
    return parse_speech_request(d, formats=FORMATS, models=MODELS, limits=Limits(max_input_chars=20))


def test_serve_error_is_a_library_error_with_openai_shape():
    e = ServeError("bad", param="x", code="c", status=404)
    assert isinstance(e, CosyJaxError)
    assert e.body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}}


@pytest.mark.parametrize("body, param, words", [
    ({"input": "hi", "voice": "v"}, "model", "missing"),
    ({"model": "other", "input": "hi", "voice": "v"}, "model", "unknown model"),
    ({"model": "m", "input": "   ", "voice": "v"}, "input", "empty"),
    ({"model": "m", "input": "x" * 21, "voice": "v"}, "input", "limit is 20"),
    ({"model": "m", "input": "hi"}, "voice", "voice"),
    ({"model": "m", "input": "hi", "voice": "v", "response_format": "aac"}, "response_format", "wav, pcm, flac"),
    ({"model": "m", "input": "hi", "voice": "v", "speed": 9}, "speed", "0.25 to 4.0"),
    ({"model": "m", "input": "hi", "voice": "v", "stream_format": "sse", "speed": 2.0}, "speed", "non-streaming"),
    ({"model": "m", "input": "hi", "voice": "v", "stream_format": "x"}, "stream_format", "audio, sse"),
    ({"model": "m", "input": "hi", "voice": "v", "stream_format": "sse", "response_format": "mp3"},
     "response_format", "pcm, wav"),
    ({"model": "m", "input": "hi", "voice": "v", "seed": -1}, "seed", "seed"),
    ({"model": "m", "input": "hi", "ref_audio": "***"}, "ref_audio", "base64"),
    ({"model": "m", "input": 3, "voice": "v"}, "input", "string"),
])
def test_bad_requests_name_the_field(body, param, words):
    with pytest.raises(ServeError) as e:
        parse_speech_request(body, formats=FORMATS, models=MODELS, limits=Limits(max_input_chars=20))
    assert e.value.param == param and e.value.status == 400
    assert words in e.value.message


def test_stream_rules():
    assert not _req(response_format="wav").stream
    assert _req(response_format="pcm").stream
    assert _req(stream_format="audio").response_format == "pcm" and _req(stream_format="audio").stream
    assert not _req(response_format="pcm", stream=False).stream
    assert _req(response_format="wav", stream=True).stream
    assert _req().response_format == "mp3"
    r = _req(ref_audio="data:audio/wav;base64,AAEC", seed=7)
    assert r.ref_audio == b"\x00\x01\x02" and r.seed == 7


def test_encoders_round_trip():
    rate = 24000
    x = (0.5 * np.sin(np.arange(2400) / 10.0)).astype(np.float32)
    assert "wav" in encodable_formats() and "pcm" in encodable_formats()
    y, sr = sf.read(io.BytesIO(encode(x, rate, "wav")), dtype="float32")
    assert sr == rate
    np.testing.assert_array_equal(y, x)  # float WAV: lossless
    p = np.frombuffer(encode(x, rate, "pcm"), "<i2")
    np.testing.assert_array_equal(p, np.frombuffer(pcm16(x), "<i2"))
    assert np.max(np.abs(p / 32767.0 - x)) < 1e-4
    for fmt in encodable_formats():
        if fmt in ("flac",):
            y, sr = sf.read(io.BytesIO(encode(x, rate, fmt)), dtype="float32")
            assert sr == rate and np.max(np.abs(y - x)) < 1e-4
    head = wav_stream_header(rate)
    y, sr = sf.read(io.BytesIO(head + float32_le(x)), dtype="float32")  # open-ended sizes still decode
    assert sr == rate
    np.testing.assert_array_equal(y, x)
    with pytest.raises(ServeError, match="not a readable audio file"):
        decode_upload(b"this is not audio at all", "notes.txt")


def _prompt(n=4, text=None):
    rng = np.random.default_rng(n)
    return Prompt(speech_token=np.arange(n, dtype=np.int32), speech_feat=rng.standard_normal((2 * n, 80)),
                  embedding=rng.standard_normal(192), prompt_text=text)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "a b", "é"])
def test_voice_names_are_validated(name):
    with pytest.raises(ServeError, match="invalid voice name"):
        check_voice_name(name)


def test_voice_store_persists_atomically_and_one_of_two_uploads_wins(tmp_path):
    store = VoiceStore(str(tmp_path))
    store.add("alice", _prompt(4), "hello there")
    again = VoiceStore(str(tmp_path))  # a restart
    v = again.get("alice")
    assert v.prompt_text == "hello there" and v.prompt.speech_token.tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["alice.npz"]  # no temporary files left
    results = []

    def upload(i):
        try:
            store.add("bob", _prompt(3 + i), None)
            results.append("ok")
        except ServeError as e:
            results.append(e.status)

    ts = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert sorted(results, key=str) == [409, 409, 409, "ok"]
    assert again.names() == ["alice", "bob"]
    again.delete("bob")
    with pytest.raises(ServeError) as e:
        store.get("bob")  # the other instance sees the deletion
    assert e.value.status == 400 and "unknown voice" in e.value.message
    with pytest.raises(ServeError) as e:
        store.delete("bob")
    assert e.value.status == 404


def test_batch_buckets():
    assert [batch_bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert batch_bucket(11, 8) == 11 and batch_bucket(5, 6) == 6


def _fake_engine(calls, delay=0.0):
    def run_batch(inputs, keys, speed):
        calls.append((list(inputs), list(keys), speed))
        time.sleep(delay)
        return [np.full((1, 3), x * speed, np.float32) for x in inputs]

    def open_stream(mi, key):
        for i in range(3):
            yield np.full((1, 2), mi * 10 + i, np.float32)

    return run_batch, open_stream


def test_scheduler_gathers_concurrent_jobs_into_one_padded_batch():
    calls = []
    s = Scheduler(*_fake_engine(calls), config=BatchConfig(max_batch=8, window_s=0.2)).start()
    try:
        futs = [s.submit([i], [100 + i]) for i in range(3)]  # 3 rows -> bucket of 4
        futs.append(s.submit([7, 8], [107, 108]))            # a 2-segment request: 5 rows -> bucket 8
        out = [f.result(5) for f in futs]
        assert len(calls) == 1
        inputs, keys, _ = calls[0]
        assert inputs == [0, 1, 2, 7, 8, 8, 8, 8] and keys == [100, 101, 102, 107, 108, 108, 108, 108]
        np.testing.assert_array_equal(out[3], [7, 7, 7, 8, 8, 8])
        np.testing.assert_array_equal(out[1], [1, 1, 1])
        # different speeds never share a batch
        f1, f2 = s.submit([1], [0], speed=1.0), s.submit([1], [0], speed=2.0)
        assert f1.result(5).tolist() == [1, 1, 1] and f2.result(5).tolist() == [2, 2, 2]
        assert sorted(c[2] for c in calls[1:]) == [1.0, 2.0]
    finally:
        s.stop()


def test_scheduler_error_reaches_the_request_and_the_worker_keeps_serving():
    calls = []
    run_batch, open_stream = _fake_engine(calls)

    def failing(inputs, keys, speed):
        if inputs[0] == -1:
            raise ValueError("boom")
        return run_batch(inputs, keys, speed)

    s = Scheduler(failing, open_stream, config=BatchConfig(window_s=0.0)).start()
    try:
        with pytest.raises(ValueError, match="boom"):
            s.submit([-1], [0]).result(5)
        assert s.submit([2], [0]).result(5).tolist() == [2, 2, 2]
        assert s.alive
    finally:
        s.stop()


def test_scheduler_streams_interleave_and_cancel_frees_the_stream():
    calls = []
    run_batch, _ = _fake_engine(calls)
    closed = []

    def open_stream(mi, key):
        try:
            for i in range(1000 if mi == 9 else 3):
                yield np.full((1, 2), mi * 10 + i, np.float32)
                time.sleep(0.001)
        finally:
            closed.append(mi)

    s = Scheduler(run_batch, open_stream).start()
    got = {1: [], 2: [], 9: []}
    done = {1: threading.Event(), 2: threading.Event(), 9: threading.Event()}

    def emit_for(k):
        def emit(kind, value):
            got[k].append((kind, None if value is None else value.tolist()))
            if kind != "chunk":
                done[k].set()
        return emit

    try:
        long = s.stream([9], [0], emit_for(9))
        s.stream([1], [0], emit_for(1))
        s.stream([2], [0], emit_for(2))
        assert done[1].wait(5) and done[2].wait(5)
        assert [v for k, v in got[1] if k == "chunk"] == [[10, 10], [11, 11], [12, 12]]
        assert got[2][-1] == ("done", None)
        assert len(got[9]) >= 3  # the long stream ran alongside the short ones
        long.cancel()
        t0 = time.time()
        while s.active_streams() and time.time() - t0 < 5:
            time.sleep(0.01)
        assert s.active_streams() == 0 and 9 in closed and s.cancelled_streams == 1
        assert not done[9].is_set()  # a cancelled stream gets no done/error callback
    finally:
        s.stop()


def test_a_stream_arriving_mid_round_waits_for_the_next_round():
    """Regression: a stream added while the worker opens others must not be stepped before it is opened."""
    calls = []
    run_batch, _ = _fake_engine(calls)
    events = {1: [], 2: []}
    done = {1: threading.Event(), 2: threading.Event()}
    holder = {}

    def emit_for(k):
        def emit(kind, value):
            events[k].append(kind)
            if kind != "chunk":
                done[k].set()
        return emit

    def open_stream(mi, key):
        if mi == 1:  # arrives exactly while the worker is opening stream 1
            holder["s"].stream([2], [0], emit_for(2))
        return iter([np.zeros((1, 2), np.float32)] * 2)

    s = Scheduler(run_batch, open_stream)
    holder["s"] = s
    s.start()
    try:
        s.stream([1], [0], emit_for(1))
        assert done[1].wait(5) and done[2].wait(5)
        assert events[1] == ["chunk", "chunk", "done"] and events[2] == ["chunk", "chunk", "done"]
    finally:
        s.stop()


def test_malloc_trimmer_runs_on_its_interval_and_stops():
    from cosyjax.serve.memory import MallocTrimmer, glibc_malloc_trim

    calls = []
    tr = MallocTrimmer(0.05, trim=lambda: calls.append(time.monotonic()) or 1).start()
    time.sleep(0.4)
    tr.stop()
    n = len(calls)
    assert 3 <= n <= 9 and tr.calls == n, n  # ~8 in 0.4 s; a loaded CPU may delay some
    time.sleep(0.15)
    assert len(calls) == n  # stopped
    off = MallocTrimmer(0.0, trim=lambda: calls.append(0) or 1).start()  # 0: never
    time.sleep(0.1)
    off.stop()
    assert len(calls) == n
    with pytest.raises(ValueError, match="interval"):
        MallocTrimmer(-1.0)
    trim = glibc_malloc_trim()
    if trim is not None:  # glibc (Linux): the real call answers 0 or 1
        assert trim() in (0, 1)


def test_compile_cache_folder_choice_and_a_second_process_loads_from_it(tmp_path, monkeypatch):
    """`--compile-cache`: default <cache>/xla, 'none' off; a program compiled by one process is written to
    the folder, and a second process with the same folder reads it instead of compiling (cache hit)."""
    import os
    import subprocess
    import sys

    from cosyjax.serve.cli import _compile_cache_dir

    monkeypatch.setenv("COSYJAX_CACHE", str(tmp_path / "root"))
    assert _compile_cache_dir(None) == str(tmp_path / "root" / "xla")
    assert _compile_cache_dir("none") is None and _compile_cache_dir("off") is None
    assert _compile_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x")
    folder = tmp_path / "xla"
    prog = (
        "import logging, sys, jax, jax.numpy as jnp\n"
        "from cosyjax.serve.cli import enable_compile_cache\n"
        "enable_compile_cache(sys.argv[1])\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(message)s')\n"
        "logging.getLogger('jax._src.compilation_cache').setLevel(logging.DEBUG)\n"
        "logging.getLogger('jax._src.compiler').setLevel(logging.DEBUG)\n"
        "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"
        "print(float(f(jnp.ones((64, 64)))))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    runs = [subprocess.run([sys.executable, "-c", prog, str(folder)], capture_output=True, text=True, env=env,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert any(p.name.startswith("jit__lambda") for p in folder.iterdir()), list(folder.iterdir())
    assert "Persistent compilation cache hit for 'jit__lambda" in runs[1].stderr, runs[1].stderr[-3000:]
    assert "Persistent compilation cache hit for 'jit__lambda" not in runs[0].stderr
