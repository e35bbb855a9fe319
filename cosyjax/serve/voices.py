"""Registered voices: prompt features (speech tokens, mel, speaker embedding, transcript) by name.

Built-in voices come from the command line (`--voice NAME=FILE`) and live in memory; uploaded ones are
stored as `<folder>/<name>.npz` (`cosyjax.prompt.Prompt.save` format), written atomically (temporary
file in the same folder + `os.replace`), so a restart finds them and a crash never leaves half a file.
Two uploads of one name at once: exactly one wins, the other gets 409 (the lock covers check + write).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import threading
from typing import Optional

from cosyjax.prompt import Prompt, PromptError
from cosyjax.serve.errors import ServeError

__all__ = ["Voice", "VoiceStore", "check_voice_name", "load_prompt_file", "VOICE_NAME_RULE"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VOICE_NAME_RULE = "1-64 characters: letters, digits, '_' and '-', starting with a letter or digit"


def check_voice_name(name, param: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ServeError(f"invalid voice name {name!r}: {VOICE_NAME_RULE}", param=param, code="invalid_voice_name")
    return name


@dataclasses.dataclass(frozen=True)
class Voice:
    name: str
    prompt: Prompt       # complete features (speech_token, speech_feat, embedding)
    prompt_text: Optional[str]
    builtin: bool

    def describe(self) -> dict:
        return {"name": self.name, "ref_text": self.prompt_text, "builtin": self.builtin,
                "prompt_tokens": int(self.prompt.speech_token.size)}


class VoiceStore:
    """Voices by name: built-ins (memory) + a folder of `.npz` files (None: uploads are refused)."""

    def __init__(self, folder: Optional[str], builtin: Optional[dict[str, Voice]] = None):
        self.folder = os.path.abspath(folder) if folder else None
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
        self._builtin = dict(builtin or {})
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[int, Voice]] = {}  # name -> (file mtime, voice)

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.npz")

    def names(self) -> list[str]:
        stored = []
        if self.folder:
            stored = [f[:-4] for f in os.listdir(self.folder) if f.endswith(".npz") and _NAME.match(f[:-4])]
        return sorted(set(self._builtin) | set(stored))

    def get(self, name: str) -> Voice:
        if name in self._builtin:
            return self._builtin[name]
        stamp = None
        if isinstance(name, str) and _NAME.match(name) and self.folder:
            try:
                stamp = os.stat(self._path(name)).st_mtime_ns  # another replica may have replaced the file
            except FileNotFoundError:
                stamp = None
        if stamp is None:
            raise ServeError(f"unknown voice {name!r}; registered voices: {', '.join(self.names()) or '(none)'}",
                             param="voice", code="voice_not_found", status=400)
        with self._lock:
            hit = self._loaded.get(name)
            if hit is None or hit[0] != stamp:
                hit = (stamp, _voice_from_file(name, self._path(name), None, builtin=False))
                self._loaded[name] = hit
            return hit[1]

    def add(self, name: str, prompt: Prompt, prompt_text: Optional[str]) -> Voice:
        """Store a new voice atomically; 409 if the name is taken (built-in or stored)."""
        check_voice_name(name)
        if not self.folder:
            raise ServeError("this server has no voices folder (start it with --voices-dir)", status=501,
                             code="voices_disabled")
        if not prompt.complete:
            raise ServeError("prompt features lack speech_token, speech_feat or embedding", param="file")
        voice = Voice(name, prompt, prompt_text, builtin=False)
        with self._lock:
            if name in self._builtin or os.path.exists(self._path(name)):
                raise ServeError(f"voice {name!r} already exists (DELETE /v1/audio/voices/{name} first)",
                                 status=409, param="name", code="voice_exists")
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    Prompt(prompt.speech_token, prompt.speech_feat, prompt.embedding, prompt_text).save(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path(name))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._loaded[name] = (os.stat(self._path(name)).st_mtime_ns, voice)
        return voice

    def delete(self, name: str) -> None:
        check_voice_name(name)
        with self._lock:
            if name in self._builtin:
                raise ServeError(f"voice {name!r} is built in (given on the command line) and cannot be deleted",
                                 status=409, param="name", code="voice_builtin")
            if not self.folder or not os.path.isfile(self._path(name)):
                raise ServeError(f"unknown voice {name!r}", status=404, param="name", code="voice_not_found")
            os.unlink(self._path(name))
            self._loaded.pop(name, None)


def _voice_from_file(name: str, path: str, prompt_text: Optional[str], builtin: bool) -> Voice:
    try:
        p = Prompt.load(path)
    except PromptError as e:
        raise ServeError(f"voice {name!r}: {e}", param="file", code="invalid_prompt") from e
    if not p.complete:
        raise ServeError(f"voice {name!r}: prompt features need speech_token, speech_feat and embedding",
                         param="file", code="invalid_prompt")
    return Voice(name, p, prompt_text if prompt_text is not None else p.prompt_text, builtin)


def load_prompt_file(name: str, path: str, prompt_text: Optional[str] = None, builtin: bool = False) -> Voice:
    """A voice from a prompt `.npz` on disk (complete features required)."""
    return _voice_from_file(name, path, prompt_text, builtin)
