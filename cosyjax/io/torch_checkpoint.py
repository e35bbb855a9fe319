"""Read PyTorch `.pt` checkpoints (zip of a pickle + raw storages) without importing torch.

`load_state_dict(path) -> dict[str, np.ndarray]` understands the zip format written by
`torch.save` since torch 1.6 (`<archive>/data.pkl`, `<archive>/data/<key>`), tensors rebuilt by
`torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, and nested dicts (a top-level
`{'state_dict': {...}}` or `{'model': {...}}` wrapper is unwrapped). Arbitrary classes are never
instantiated: unknown globals raise `CheckpointError`, so a malicious pickle cannot run code.
"""
from __future__ import annotations
from cosyjax.errors import CosyJaxError

import collections
import os
import pickle
import zipfile
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "load_state_dict", "load_pickle_tree"]


class CheckpointError(CosyJaxError):
    """A checkpoint file that cannot be read, or whose keys do not match the model."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}

_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": "bfloat16", "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


def _np_dtype(d):
    if isinstance(d, str) and d == "bfloat16":
        import ml_dtypes  # shipped with jax

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d)


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        if name not in _STORAGE_DTYPES:
            raise CheckpointError(f"unsupported torch storage type {name!r}")
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _TorchDtype:
    def __init__(self, name: str):
        self.dtype = _np_dtype(_TORCH_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
    arr: np.ndarray = storage
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) == 0:
        return np.array(arr[offset])
    itemsize = arr.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        arr[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)  # own the memory, contiguous


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, fileobj, zf: zipfile.ZipFile, prefix: str):
        super().__init__(fileobj)
        self._zf = zf
        self._prefix = prefix
        self._cache: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        if module == "torch.serialization" and name == "_get_layout":
            return lambda *a: None
        if module == "torch" and name == "strided":
            return None
        raise CheckpointError(f"checkpoint pickle references unsupported global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if isinstance(storage_type, _TorchDtype):  # torch >= 2.x UntypedStorage path
            dtype = storage_type.dtype
        elif isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        else:
            raise CheckpointError(f"unsupported storage type {storage_type!r}")
        if key not in self._cache:
            raw = self._zf.read(f"{self._prefix}/data/{key}")
            self._cache[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=int(numel))
        return self._cache[key]


def load_pickle_tree(path: str | os.PathLike) -> Any:
    """Unpickle a `torch.save` zip file into nested Python containers of numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (legacy non-zip .pt files are not supported; "
            "re-save it with torch>=1.6)"
        ) from e
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkls:
            raise CheckpointError(f"{path}: no data.pkl inside the zip")
        pkl = pkls[0]
        prefix = pkl[: -len("/data.pkl")] if "/" in pkl else ""
        byteorder = f"{prefix}/byteorder" if prefix else "byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        with zf.open(pkl) as f:
            try:
                return _Unpickler(f, zf, prefix).load()
            except CheckpointError:
                raise
            except Exception as e:  # truncated / corrupted file
                raise CheckpointError(f"{path}: cannot unpickle checkpoint: {e}") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a flat `{key: array}` state dict from a `.pt` file (no torch needed)."""
    tree = load_pickle_tree(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(tree, dict) and wrapper in tree and isinstance(tree[wrapper], dict):
            tree = tree[wrapper]
    if not isinstance(tree, dict):
        raise CheckpointError(f"{os.fspath(path)}: expected a state dict, found {type(tree).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
        elif isinstance(v, (int, float)) and str(k) in ("epoch", "step"):
            continue  # training bookkeeping saved next to the weights
        else:
            raise CheckpointError(f"{os.fspath(path)}: entry {k!r} is not a tensor ({type(v).__name__})")
    return out
