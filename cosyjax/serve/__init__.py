"""`cosyjax serve`: an OpenAI-compatible speech server (FastAPI + uvicorn; optional Ray Serve scale-out).

`create_app(tts, ServeConfig(...))` builds the FastAPI app around a loaded `cosyjax.api.CosyVoice`;
`cosyjax serve --model-dir DIR` runs it (see `cosyjax.serve.cli`). Endpoints: `POST /v1/audio/speech`,
`GET|POST /v1/audio/voices`, `DELETE /v1/audio/voices/{name}`, `GET /v1/models`, `GET /health`,
`GET /metrics`. Needs the `[serve]` extra (fastapi, uvicorn, python-multipart); the modules that do not
touch FastAPI (`audio`, `voices`, `batcher`, `speech_request`) import without it.
"""
from cosyjax.serve.errors import ServeError

__all__ = ["ServeError", "ServeConfig", "create_app"]


def __getattr__(name):  # FastAPI is an optional extra: import the app lazily
    if name in ("ServeConfig", "create_app"):
        from cosyjax.serve import app

        return getattr(app, name)
    raise AttributeError(name)
