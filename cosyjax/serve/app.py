"""The FastAPI app: OpenAI's `POST /v1/audio/speech` over a loaded `cosyjax.api.CosyVoice`.

```python
from cosyjax.api import CosyVoice
from cosyjax.serve.app import ServeConfig, create_app
app = create_app(CosyVoice.from_pretrained(model_dir), ServeConfig(voices_dir="voices"))
# uvicorn.run(app, host="127.0.0.1", port=8000)
```

Modes: `instructions` given -> instruct2; the voice has a transcript (`ref_text`) -> zero_shot; else
cross_lingual. CosyVoice3 prompts get upstream's system prefix (`You are a helpful assistant.` +
`<|endofprompt|>`) unless the text already holds `<|endofprompt|>`. Each text segment i of a request
with `seed` s uses key `fold_in(PRNGKey(s), i)`, as `CosyVoice.inference_*(..., seed=s)` does, so
the server's audio equals the library's. Without `seed` the server draws one and returns it in the
`x-cosyjax-seed` header.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import os
import tempfile
import time
from typing import Optional

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cosyjax.errors import CosyJaxError
from cosyjax.prompt import Prompt, PromptError
from cosyjax.serve.audio import (MEDIA_TYPES, decode_upload, encodable_formats, encode, float32_le, pcm16,
                                 wav_stream_header)
from cosyjax.serve.batcher import BatchConfig, Scheduler
from cosyjax.serve.errors import ServeError
from cosyjax.serve.memory import MallocTrimmer
from cosyjax.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from cosyjax.serve.speech_request import Limits, SpeechRequest, parse_speech_request
from cosyjax.serve.voices import Voice, VoiceStore, check_voice_name, load_prompt_file

__all__ = ["ServeConfig", "create_app", "SpeechService"]

log = logging.getLogger("cosyjax.serve")

OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
_ONNX_FOR_AUDIO = {"cosyvoice2": ("campplus.onnx", "speech_tokenizer_v2.onnx"),
                   "cosyvoice3": ("campplus.onnx", "speech_tokenizer_v3.onnx")}
_EOP = "<|endofprompt|>"
_CV3_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_name: Optional[str] = None          # id in /v1/models (default: the model folder's name)
    voices_dir: Optional[str] = None          # where uploaded voices are stored (None: uploads refused)
    voices: tuple[tuple[str, str], ...] = ()  # built-in (name, prompt .npz path) pairs
    api_key: Optional[str] = None             # bearer key required on every route but /health
    max_batch: int = 8
    batch_window_ms: float = 20.0
    max_input_chars: int = 4096
    max_upload_bytes: int = 10 * 2 ** 20
    text_frontend: bool = True
    stream_slots: int = 8                     # LLM slots shared by concurrent streams (0: each stream alone)
    stream_capacity: int = 1024               # KV entries per slot (prompt + generated tokens)
    batch_streams: Optional[bool] = None      # streams' flow/vocoder calls batched (StageGang); None: off on CPU
    malloc_trim_s: float = 10.0               # give freed heap back to the OS this often (glibc; 0: never)
    compile_cache: Optional[str] = None       # XLA's persistent compilation cache folder (set by the process owner)


def _has_eop(text: str) -> bool:
    return _EOP in text


def _batch_streams(choice: Optional[bool], engine) -> bool:
    """Batch concurrent streams' stage calls? None (auto): yes unless the engine's parameters are on CPU,
    where a stage's cost is proportional to its rows (8 streams' flow chunks vmapped took 327 ms
    against 242 ms one after the other, demo folder, 2-core CPU) and batching only adds thread hops."""
    if choice is not None:
        return bool(choice)
    import jax

    leaf = jax.tree_util.tree_leaves(engine.params)[0]
    return any(d.platform != "cpu" for d in getattr(leaf, "devices", lambda: set())())


class SpeechService:
    """Request -> model inputs + keys (frontend, host side); owns the scheduler around the engine."""

    def __init__(self, tts, config: ServeConfig, metrics: ServerMetrics):
        self.tts, self.config, self.metrics = tts, config, metrics
        self.sample_rate = int(tts.sample_rate)
        self.version = tts.version
        self.model_name = config.model_name or os.path.basename(os.path.normpath(tts.model_dir))
        self.models = tuple(dict.fromkeys((self.model_name, self.version) + OPENAI_MODEL_ALIASES))
        self.formats = encodable_formats()
        self.limits = Limits(max_input_chars=config.max_input_chars, max_ref_audio_bytes=config.max_upload_bytes)
        builtin = {}
        for name, path in config.voices:
            check_voice_name(name, param="--voice")
            builtin[name] = load_prompt_file(name, path, builtin=True)
        self.voices = VoiceStore(config.voices_dir, builtin)
        engine = tts.engine
        self.gang = None
        if _batch_streams(config.batch_streams, engine):
            from cosyjax.stage_batch import StageGang

            self.gang = StageGang()
        self.slot_streams = None
        if config.stream_slots > 0:
            from cosyjax.serve.slot_streams import SlotStreams

            self.slot_streams = SlotStreams(engine, config.stream_slots, config.stream_capacity, gang=self.gang)
        open_stream = self.slot_streams.open if self.slot_streams is not None else \
            (lambda mi, key: engine.tts(mi, stream=True, key=key, stage_runner=self.gang))
        self.scheduler = Scheduler(
            run_batch=lambda inputs, keys, speed: engine.synthesize_batch(inputs, keys, speed=speed),
            open_stream=open_stream,
            config=BatchConfig(max_batch=config.max_batch, window_s=config.batch_window_ms / 1000.0),
            on_batch=metrics.on_batch, gang=self.gang)

    # ------------------------------------------------------------------ prompts
    def prompt_from_bytes(self, data: bytes, filename: Optional[str], param: str) -> Prompt:
        """An uploaded prompt `.npz` or audio file -> complete prompt features (ServeError otherwise)."""
        if data[:4] == b"PK\x03\x04":  # a zip: the prompt .npz format
            fd, tmp = tempfile.mkstemp(suffix=".npz")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                p = Prompt.load(tmp)
            except PromptError as e:
                raise ServeError(f"{param}: {e}", param=param, code="invalid_prompt") from e
            finally:
                os.unlink(tmp)
            if not p.complete:
                raise ServeError(f"{param}: prompt .npz needs speech_token, speech_feat and embedding", param=param,
                                 code="invalid_prompt")
            return p
        samples, rate = decode_upload(data, filename)
        missing = [n for n in _ONNX_FOR_AUDIO[self.version] if not os.path.isfile(os.path.join(self.tts.model_dir, n))]
        if missing:
            raise ServeError(f"voices from audio need {', '.join(missing)} in the model folder, which lacks them; "
                             "upload a prompt .npz (speech_token, speech_feat, embedding) instead",
                             status=501, param=param, code="missing_model_files")
        f = self.tts.prompt_features((samples, rate))
        return Prompt(speech_token=f.speech_token, speech_feat=f.speech_feat, embedding=f.embedding)

    # ------------------------------------------------------------------ requests -> model inputs
    def _prompt_text(self, text: str) -> str:
        if self.version == "cosyvoice3" and not _has_eop(text):
            return _CV3_SYSTEM + _EOP + text
        return text

    def _instruct_text(self, text: str) -> str:
        if _has_eop(text):
            return text
        return (f"{_CV3_SYSTEM} {text}" if self.version == "cosyvoice3" else text) + _EOP

    def model_inputs(self, req: SpeechRequest, seed: int) -> tuple[str, list, list]:
        """(mode, model inputs, keys): one model input per text segment, key i = fold_in(PRNGKey(seed), i)."""
        import jax

        tts, tf = self.tts, self.config.text_frontend
        if req.ref_audio is not None:
            prompt, ref_text = self.prompt_from_bytes(req.ref_audio, None, "ref_audio"), req.ref_text
        else:
            voice: Voice = self.voices.get(req.voice)
            prompt, ref_text = voice.prompt, (req.ref_text if req.ref_text is not None else voice.prompt_text)
        segments = tts.text_normalize(req.input, split=True, text_frontend=tf)
        if not segments:
            raise ServeError("input has nothing to say after text normalisation", param="input", code="empty_input")
        if req.instructions is not None:
            mode, instruct = "instruct2", self._instruct_text(req.instructions)
            inputs = [tts.frontend_instruct2(s, instruct, prompt) for s in segments]
        elif ref_text:
            mode = "zero_shot"
            ptext = tts.text_normalize(self._prompt_text(ref_text), split=False, text_frontend=tf)
            inputs = [tts.frontend_zero_shot(s, ptext, prompt) for s in segments]
        else:
            mode = "cross_lingual"
            pre = _CV3_SYSTEM + _EOP if self.version == "cosyvoice3" else ""
            inputs = [tts.frontend_cross_lingual(s if _has_eop(s) else pre + s, prompt) for s in segments]
        base = jax.random.PRNGKey(int(seed))
        return mode, inputs, [jax.random.fold_in(base, i) for i in range(len(inputs))]


# ---------------------------------------------------------------------------------------- app
def _error(status: int, message: str, *, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse(ServeError(message, status=status, param=param, code=code, type=type).body(), status_code=status)


class _CountRequests:
    """ASGI middleware: counts responses by route template and status (no unbounded label values)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status[0])).inc()


class _RequireKey:
    """ASGI middleware: `Authorization: Bearer <key>` on every route but /health (constant-time compare)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            resp = _error(401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key")
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(tts, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving `tts` (a `cosyjax.api.CosyVoice`); its device worker runs while the app does."""
    from contextlib import asynccontextmanager

    metrics = ServerMetrics()
    svc = SpeechService(tts, config, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        svc.scheduler.start()
        trimmer = MallocTrimmer(config.malloc_trim_s).start()
        try:
            yield
        finally:
            trimmer.stop()
            svc.scheduler.stop()

    app = FastAPI(title="cosyjax speech", lifespan=lifespan)
    app.state.service = svc
    app.state.metrics = metrics

    @app.exception_handler(ServeError)
    async def _serve_error(_req, e: ServeError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(CosyJaxError)
    async def _library_error(_req, e: CosyJaxError):  # the library's bad-input errors (text, prompt, engine)
        return _error(400, str(e), code=type(e).__name__)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        return _error(400, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}",
                      param=loc[-1] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):  # a bug: logged with its traceback, answered as OpenAI's 500 shape
        log.exception("internal error")
        return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    # ------------------------------------------------------------------ info routes
    @app.get("/health")
    async def health():
        ok = svc.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": svc.model_name, "pid": os.getpid(),
                             "version": svc.version, "sample_rate": svc.sample_rate,
                             "active_streams": svc.scheduler.active_streams(),
                             "queued_segments": svc.scheduler.queue_depth()}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "cosyjax"}
                                           for m in svc.models]}

    @app.get("/metrics")
    async def prometheus():
        metrics.active_streams.set(svc.scheduler.active_streams())
        metrics.queue_depth.set(svc.scheduler.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ voices
    @app.get("/v1/audio/voices")
    async def list_voices():
        out = []
        for n in svc.voices.names():
            try:
                out.append(svc.voices.get(n).describe())
            except ServeError as e:  # a damaged file in the folder is reported, not fatal
                out.append({"name": n, "error": e.message})
        return {"object": "list", "data": out}

    @app.post("/v1/audio/voices", status_code=201)
    async def add_voice(name: str = Form(...), file: UploadFile = File(...),
                        ref_text: Optional[str] = Form(None)):
        check_voice_name(name)
        limit = config.max_upload_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ServeError(f"upload is larger than the {limit} byte limit", status=413, param="file",
                             code="too_large")
        if not data:
            raise ServeError("uploaded file is empty", param="file", code="invalid_audio")
        prompt = await run_in_threadpool(svc.prompt_from_bytes, data, file.filename, "file")
        text = ref_text if ref_text is not None else prompt.prompt_text
        voice = await run_in_threadpool(svc.voices.add, name, prompt, text or None)
        return JSONResponse(voice.describe(), status_code=201)

    @app.delete("/v1/audio/voices/{name}")
    async def delete_voice(name: str):
        await run_in_threadpool(svc.voices.delete, name)
        return {"name": name, "deleted": True}

    # ------------------------------------------------------------------ speech
    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        t0 = time.perf_counter()
        raw = await request.body()
        if len(raw) > config.max_upload_bytes * 2:
            raise ServeError("request body too large", status=413, code="too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(f"malformed JSON body: {e}", code="invalid_json") from e
        req = parse_speech_request(body, formats=svc.formats, models=svc.models, limits=svc.limits)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
        mode, inputs, keys = await run_in_threadpool(svc.model_inputs, req, seed)
        headers = {"x-cosyjax-seed": str(seed), "x-cosyjax-mode": mode}
        if not req.stream:
            audio = await asyncio.wrap_future(svc.scheduler.submit(inputs, keys, req.speed))
            data = await run_in_threadpool(encode, audio, svc.sample_rate, req.response_format)
            dt = time.perf_counter() - t0
            metrics.latency.labels("batch").observe(dt)
            metrics.ttfa.labels("batch").observe(dt)
            metrics.audio_seconds.labels("batch").inc(audio.size / svc.sample_rate)
            return Response(data, media_type=MEDIA_TYPES[req.response_format], headers=headers)
        return _stream_response(svc, metrics, req, inputs, keys, headers, t0)

    return _finish(app, config, metrics)


def _finish(app: FastAPI, config: ServeConfig, metrics: ServerMetrics) -> FastAPI:
    # order (outermost first): request counting, API key, the app
    if config.api_key:
        app.add_middleware(_RequireKey, key=config.api_key)
    app.add_middleware(_CountRequests, metrics=metrics)
    return app


def _stream_response(svc: SpeechService, metrics: ServerMetrics, req: SpeechRequest, inputs, keys, headers, t0):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind, value):  # worker thread -> event loop; a closed loop means the client is long gone
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    ticket = svc.scheduler.stream(inputs, keys, emit)
    sse = req.stream_format == "sse"

    def sse_event(obj) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def body():
        finished, first, samples = False, True, 0
        try:
            if req.response_format == "wav":
                head = wav_stream_header(svc.sample_rate)
                yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(head).decode()}) if sse \
                    else head
            while True:
                kind, value = await queue.get()
                if kind == "chunk":
                    if value.size == 0:
                        continue
                    if first:
                        metrics.ttfa.labels("stream").observe(time.perf_counter() - t0)
                        first = False
                    samples += value.size
                    b = float32_le(value) if req.response_format == "wav" else pcm16(value)
                    yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(b).decode()}) if sse else b
                elif kind == "done":
                    finished = True
                    if sse:
                        yield sse_event({"type": "speech.audio.done",
                                         "usage": {"input_tokens": len(req.input), "output_tokens": samples,
                                                   "total_tokens": len(req.input) + samples}})
                    break
                else:  # the status line is sent: report in-band (SSE) and end the body
                    finished = True
                    log.error("stream failed: %r", value)
                    metrics.stream_errors.inc()
                    if sse:
                        yield sse_event({"type": "error", "error": {"message": str(value), "type": "server_error"}})
                    break
        finally:
            if not finished:  # client disconnected (or the server is stopping): free the stream's work
                ticket.cancel()
                metrics.streams_cancelled.inc()
            metrics.latency.labels("stream").observe(time.perf_counter() - t0)
            metrics.audio_seconds.labels("stream").inc(samples / svc.sample_rate)

    media = "text/event-stream" if sse else MEDIA_TYPES[req.response_format]
    return StreamingResponse(body(), media_type=media, headers=headers)
