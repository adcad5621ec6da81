"""Read PyTorch checkpoint files (`pytorch_model.bin`, Composer `model.pt`) without torch.

Since torch 1.6 `torch.save` writes a zip archive: `<root>/data.pkl` is a pickle whose tensors
point, through pickle "persistent ids", at raw storages `<root>/data/<key>`. We unpickle it with a
restricted unpickler: tensor-rebuilding functions become NumPy constructors, plain containers are
allowed, and every other class (Composer's trainer state, optimizers, loggers) becomes an inert
`Stub`, so no code from the file runs and the tensors are kept. Only reading is supported.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch storage class name -> NumPy dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class Stub:
    """Stands in for any class the checkpoint references that we do not need."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> "Stub":
        return Stub(*args, **kwargs)


def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"__module__": f"m2jax.stubbed.{module}"})


class _StorageRef:
    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(
    storage: _StorageRef, offset: int, size: tuple, stride: tuple, *unused: Any
) -> np.ndarray:
    flat = storage.array
    if not size:
        return flat[offset].copy()
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive, self._root = archive, root
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex", "range"):
            return getattr(__import__("builtins"), name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            return getattr(np._core.multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module.startswith("numpy.dtypes"):
            return np.dtype
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        if key not in self._storages:
            dtype = _STORAGE_DTYPES.get(storage_type if isinstance(storage_type, str) else "")
            if dtype is None:
                raise pickle.UnpicklingError(f"unsupported torch storage type {storage_type!r}")
            raw = self._archive.read(f"{self._root}/data/{key}")
            self._storages[key] = _StorageRef(np.frombuffer(raw, dtype=dtype, count=numel))
        return self._storages[key]


def load_torch_file(path: str) -> Any:
    """Unpickles a zip-format torch checkpoint; tensors come back as NumPy arrays.

    Raises ValueError for files that are not zip-format torch checkpoints (for instance the
    pre-1.6 legacy format), naming the file.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a zip-format PyTorch checkpoint (torch >= 1.6 `torch.save`); re-save it "
            "with a recent torch, or convert it to safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ValueError(f"{path}: zip archive has no data.pkl; not a PyTorch checkpoint")
        root = pickles[0].rsplit("/", 1)[0] if "/" in pickles[0] else ""
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pickles[0]) as f:
            return _RestrictedUnpickler(io.BytesIO(f.read()), archive, root).load()
