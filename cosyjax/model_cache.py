"""Convert a model folder's checkpoints once and cache the orbax parameter trees.

The cache key hashes, for every input file (`<v>.yaml`, `llm.pt`, `flow.pt`, `hift.pt`,
`CosyVoice-BlankEN/config.json`), its name, size and modification time, plus the package version
and the converter sources (`convert/*.py`), so an edited checkpoint or a changed parameter layout
is converted again. Layout:
`<cache_root>/params/<folder name>-<key>/{llm,flow,hift}` (orbax), `<...>/meta.json`.
Default `cache_root`: `$COSYJAX_CACHE` or `~/.cache/cosyjax`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Optional

from cosyjax.config import ModelConfig

__all__ = ["CACHE_FORMAT", "cache_root", "params_cache_dir", "load_or_convert_params"]

CACHE_FORMAT = 1
COMPONENTS = ("llm", "flow", "hift")


def cache_root(cache_dir: Optional[str] = None) -> str:
    return os.path.abspath(cache_dir or os.environ.get("COSYJAX_CACHE")
                           or os.path.join(os.path.expanduser("~"), ".cache", "cosyjax"))


def _input_files(cfg: ModelConfig) -> list[str]:
    names = [f"{cfg.version}.yaml", "llm.pt", "flow.pt", "hift.pt", os.path.join("CosyVoice-BlankEN", "config.json")]
    return [os.path.join(cfg.model_dir, n) for n in names if os.path.exists(os.path.join(cfg.model_dir, n))]


def _converter_digest() -> str:
    """Hash of the converter sources: a changed key map or parameter layout invalidates old caches."""
    import convert

    h = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(convert.__file__))
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def cache_key(cfg: ModelConfig) -> str:
    from cosyjax import __version__

    h = hashlib.sha256(f"cosyjax {__version__} format {CACHE_FORMAT} converters {_converter_digest()}\n".encode())
    for path in _input_files(cfg):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, cfg.model_dir)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def params_cache_dir(cfg: ModelConfig, cache_dir: Optional[str] = None) -> str:
    name = os.path.basename(os.path.normpath(cfg.model_dir)) or "model"
    return os.path.join(cache_root(cache_dir), "params", f"{name}-{cache_key(cfg)}")


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json")) and all(
        os.path.isdir(os.path.join(path, c)) for c in COMPONENTS)


def load_or_convert_params(cfg: ModelConfig, cache_dir: Optional[str] = None, *, use_cache: bool = True,
                           force: bool = False, out: Optional[str] = None,
                           log: Callable[[str], Any] = lambda s: None) -> tuple[dict, str]:
    """Parameters {'llm','flow','hift'} for the folder: from the cache, or converted (and cached).

    Returns (params, where): `where` is the checkpoint folder, or '' when caching is off.
    """
    from convert.registry import convert_component, load_params, save_params

    target = os.path.abspath(out) if out else params_cache_dir(cfg, cache_dir)
    if use_cache and not force and _complete(target):
        t0 = time.time()
        params = {c: load_params(os.path.join(target, c)) for c in COMPONENTS}
        log(f"loaded converted checkpoint {target} ({time.time() - t0:.1f} s)")
        return params, target
    t0 = time.time()
    params = {c: convert_component(c, cfg) for c in COMPONENTS}
    log(f"converted {cfg.model_dir} ({time.time() - t0:.1f} s)")
    if not use_cache:
        return params, ""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp, exist_ok=True)
        for c in COMPONENTS:
            save_params(os.path.join(tmp, c), params[c])
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"model_dir": cfg.model_dir, "version": cfg.version, "key": cache_key(cfg),
                       "format": CACHE_FORMAT, "files": [os.path.relpath(p, cfg.model_dir) for p in _input_files(cfg)]},
                      f, indent=1)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(tmp, target)
        log(f"cached converted checkpoint in {target}")
    except OSError as e:  # a read-only cache must not stop synthesis
        log(f"warning: could not cache the converted checkpoint in {target}: {e}")
        shutil.rmtree(tmp, ignore_errors=True)
        return params, ""
    return params, target
