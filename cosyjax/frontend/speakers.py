"""Saved speakers (upstream `spk2info`): read upstream's `spk2info.pt`, keep prepared zero-shot prompts.

Upstream keeps `spk2info = {spk_id: {name: tensor}}`: SFT-style entries `{'embedding': [1, 192]}`
(CosyVoice-300M-SFT/Instruct) and the zero-shot entries written by `add_zero_shot_spk` (the
`frontend_zero_shot` model input minus `text`/`text_len`), saved with `torch.save` to
`<model_dir>/spk2info.pt`. `SpeakerStore.load` reads that pickle without torch
(`cosyjax.io.torch_checkpoint.load_pickle_tree`) or our own torch-free `.npz` format, which
`SpeakerStore.save` writes: one array per `(speaker, name)` plus a JSON index `__spk2info__`.
"""
from __future__ import annotations

import collections.abc
import json
import os
from typing import Iterator

import numpy as np

from cosyjax.frontend.errors import SpeakerError

__all__ = ["SpeakerStore"]

_INDEX_KEY = "__spk2info__"
_FORMAT = "cosyjax-spk2info"


def _entry_arrays(spk_id, entry, source: str) -> dict[str, np.ndarray]:
    if not isinstance(entry, collections.abc.Mapping):
        raise SpeakerError(f"{source}: speaker {spk_id!r} is a {type(entry).__name__}, expected a dict of tensors")
    out = {}
    for name, value in entry.items():
        if isinstance(value, (np.ndarray, int, float, list, tuple)):
            out[str(name)] = np.asarray(value)
        else:
            raise SpeakerError(f"{source}: speaker {spk_id!r} field {name!r} is a {type(value).__name__}, "
                               "expected a tensor")
    return out


class SpeakerStore(collections.abc.MutableMapping):
    """`{spk_id: {name: np.ndarray}}` with `load(path)` (.pt or .npz) and `save(path)` (.npz)."""

    def __init__(self, speakers: dict | None = None, source: str = ""):
        self._spk: dict[str, dict[str, np.ndarray]] = {}
        self.source = source
        for k, v in (speakers or {}).items():
            self[k] = v

    # mapping protocol
    def __getitem__(self, spk_id: str) -> dict[str, np.ndarray]:
        try:
            return self._spk[spk_id]
        except KeyError:
            known = ", ".join(sorted(self._spk)) or "none"
            raise SpeakerError(f"unknown speaker id {spk_id!r} (available: {known})") from None

    def __setitem__(self, spk_id: str, entry) -> None:
        if not isinstance(spk_id, str) or not spk_id:
            raise SpeakerError(f"speaker id must be a non-empty str, got {spk_id!r}")
        self._spk[spk_id] = _entry_arrays(spk_id, entry, self.source or "speaker store")

    def __delitem__(self, spk_id: str) -> None:
        del self._spk[spk_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._spk)

    def __len__(self) -> int:
        return len(self._spk)

    def __contains__(self, spk_id) -> bool:
        return spk_id in self._spk

    def get(self, spk_id, default=None):
        return self._spk.get(spk_id, default)

    def __repr__(self) -> str:
        return f"SpeakerStore({list(self._spk)})"

    # files
    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpeakerStore":
        """Read upstream's torch `spk2info.pt` or a `.npz` written by `save`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SpeakerError(f"speaker file not found: {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] == b"PK":
            import zipfile

            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
            if f"{_INDEX_KEY}.npy" in names:
                return cls._load_npz(path)
            from cosyjax.io.torch_checkpoint import CheckpointError, load_pickle_tree

            try:
                tree = load_pickle_tree(path)
            except CheckpointError as e:
                raise SpeakerError(f"cannot read speaker file {path}: {e}") from e
            if not isinstance(tree, collections.abc.Mapping):
                raise SpeakerError(f"{path}: expected a dict {{spk_id: {{name: tensor}}}}, found {type(tree).__name__}")
            store = cls(source=path)
            for spk_id, entry in tree.items():
                store._spk[str(spk_id)] = _entry_arrays(spk_id, entry, path)
            return store
        raise SpeakerError(f"{path} is neither a torch zip checkpoint nor a cosyjax .npz speaker file")

    @classmethod
    def _load_npz(cls, path: str) -> "SpeakerStore":
        with np.load(path, allow_pickle=False) as z:
            try:
                index = json.loads(str(z[_INDEX_KEY]))
            except (KeyError, ValueError) as e:
                raise SpeakerError(f"{path}: broken speaker index: {e}") from e
            if index.get("format") != _FORMAT:
                raise SpeakerError(f"{path}: not a cosyjax speaker file (format {index.get('format')!r})")
            store = cls(source=path)
            for i, (spk_id, names) in enumerate(index["speakers"]):
                store._spk[spk_id] = {name: z[f"s{i}.{name}"] for name in names}
        return store

    def save(self, path: str | os.PathLike) -> str:
        """Write all speakers to a torch-free `.npz` (suffix added if missing); returns the path."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        arrays = {}
        index = {"format": _FORMAT, "version": 1, "speakers": []}
        for i, (spk_id, entry) in enumerate(self._spk.items()):
            index["speakers"].append([spk_id, list(entry)])
            for name, arr in entry.items():
                arrays[f"s{i}.{name}"] = np.asarray(arr)
        arrays[_INDEX_KEY] = np.array(json.dumps(index, ensure_ascii=False))
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path
