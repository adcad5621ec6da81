"""Read PyTorch checkpoint files (`pytorch_model.bin`, Composer `model.pt`) without torch, safely.

Since torch 1.6 `torch.save` writes a zip archive: `<root>/data.pkl` is a pickle whose tensors
point, through pickle "persistent ids", at raw storages `<root>/data/<key>`. We unpickle it with a
restricted unpickler: tensor-rebuilding functions become NumPy constructors, plain containers are
allowed, and every other class (Composer's trainer state, optimizers, loggers) becomes an inert
`Stub`, so no code from the file runs and the tensors are kept. Only reading is supported.

The file is untrusted input. The pickle is run twice: first with nothing read, to check every
tensor view against its storage (offset, sizes and strides in exact integer arithmetic, negative
strides refused) and every storage against its zip entry (the declared size must be exactly what
the pickle says, and what the tensors use; deflated entries may not inflate beyond
`MAX_INFLATION` times their compressed size; entries may not overlap); then the storages are read,
capped at their checked sizes, and the pickle is run again to build the arrays. Anything
malformed or crafted raises `CheckpointFileError` naming the file (and the entry).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
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
# data.pkl holds names and metadata only (tensors live in the storages); Composer's is ~1 MB.
MAX_PICKLE_BYTES = 256 << 20
# torch stores entries uncompressed; a re-zipped checkpoint of float weights deflates ~1.1x. A
# deflated entry above 1 MiB that inflates more than this is refused as a decompression bomb.
MAX_INFLATION = 20
_INFLATION_FLOOR = 1 << 20
# Views that must be copied (not the whole storage in order) may total at most this many times
# the storages' bytes, plus a floor: a state dict and its optimizer state may view one storage.
MAX_COPY_FACTOR = 2
_COPY_FLOOR = 64 << 20
_MAX_NDIM = 32
_PARAMETER_REBUILDERS = ("_rebuild_parameter", "_rebuild_parameter_with_state")
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


class CheckpointFileError(ValueError):
    """A checkpoint file that is malformed, truncated or crafted; the message names the file."""


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


def _num(n: int) -> str:
    """An integer for a message (str() refuses integers of more than 4300 digits)."""
    return str(n) if abs(n) < 10**30 else f"~2^{abs(n).bit_length() - 1}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _StorageRef:
    """A storage named by the pickle: its zip entry key, element dtype and element count."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, np.dtype(dtype), numel
        self.used = 0  # elements reached by the furthest tensor view
        self.viewed = False  # whether any tensor views it (else it is never read)


class _View:
    """A checked tensor view: `count` elements of `storage` from `offset` with `stride`."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.count = math.prod(size)
        # Exact (unbounded) integer arithmetic: no overflow whatever the file says.
        self.end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if self.count else 0

    @property
    def whole_storage_in_order(self) -> bool:
        """The view is the storage itself, C-ordered: a reshape, no copy."""
        if self.offset or self.count != self.storage.numel:
            return False
        expected = 1
        for n, s in zip(reversed(self.size), reversed(self.stride)):
            if n > 1 and s != expected:
                return False
            expected *= n
        return True


def _safe_set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise pickle.UnpicklingError(f"set() of a {type(items).__name__}")
    return set(items)


def _safe_frozenset(items: Any = ()) -> frozenset:
    return frozenset(_safe_set(items))


def _safe_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use to store bytes (NumPy array data)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 strings")
    return text.encode("latin1")


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    # Restoring an object array allocates (and fills) it before checking its data.
    if dtype.hasobject:
        raise pickle.UnpicklingError("NumPy object arrays are not allowed")
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # NumPy pickles an empty array and fills it by __setstate__, which checks the data's size.
    if subtype is not np.ndarray or not isinstance(shape, tuple) or math.prod(shape) != 0:
        raise pickle.UnpicklingError("numpy _reconstruct with unexpected arguments")
    return np._core.multiarray._reconstruct(np.ndarray, shape, dtype)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
    return data


class _Unpickler(pickle.Unpickler):
    """One pass over data.pkl. With `arrays` None (planning) tensors are checked and recorded,
    nothing is read; with `arrays` (key -> flat NumPy array) they are built."""

    def __init__(self, reader: "_Reader", arrays: dict[str, np.ndarray] | None):
        super().__init__(io.BytesIO(reader.pickle_bytes))
        self._reader, self._arrays = reader, arrays
        self.storages: dict[str, _StorageRef] = {}
        self.views: dict[tuple, Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if module == "torch._utils" and name in _PARAMETER_REBUILDERS:
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in ("slice", "complex"):
            return {"slice": slice, "complex": complex}[name]
        if module == "builtins" and name in ("set", "frozenset"):
            return _safe_set if name == "set" else _safe_frozenset
        if module == "_codecs" and name == "encode":
            return _safe_encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _safe_reconstruct
            if name == "scalar":
                return np._core.multiarray.scalar
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if (module == "numpy" and name == "dtype") or module.startswith("numpy.dtypes"):
            return _safe_dtype
        return _stub_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self._reader.error("a persistent id that is not a torch storage")
        _, storage_type, key, _location, numel = pid
        if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
            raise self._reader.error("a storage key that is not a short name")
        dtype = _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None
        if dtype is None:
            raise self._reader.error(f"storage {key}: unsupported storage type")
        if not _is_int(numel) or numel < 0:
            raise self._reader.error(f"storage {key}: its size is not a count of elements")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, dtype, numel)
        elif ref.dtype != np.dtype(dtype) or ref.numel != numel:
            raise self._reader.error(f"storage {key} is declared twice with different types")
        return ref

    def _rebuild_tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, *unused: Any
    ) -> np.ndarray | None:
        if not isinstance(storage, _StorageRef):
            raise self._reader.error("a tensor without a storage")
        view = self._check_view(storage, offset, size, stride)
        memo_key = (storage.key, view.offset, view.size, view.stride)
        if memo_key in self.views:  # tied weights: one array, as torch shares one storage
            return self.views[memo_key]
        if self._arrays is None:
            storage.used, storage.viewed = max(storage.used, view.end), True
            self.views[memo_key] = None
            return None
        if view.count == 0:
            out = np.zeros(view.size, storage.dtype)
        elif view.whole_storage_in_order:
            flat = self._arrays[storage.key]
            out = flat.reshape(view.size)
        else:
            flat = self._arrays[storage.key]
            item = flat.dtype.itemsize
            out = np.array(  # a C-ordered copy
                np.lib.stride_tricks.as_strided(
                    flat[view.offset :],
                    shape=view.size,
                    strides=tuple(s * item for s in view.stride),
                    writeable=False,
                ),
                order="C",
            )
        self.views[memo_key] = out
        return out

    def _check_view(self, storage: _StorageRef, offset: Any, size: Any, stride: Any) -> _View:
        entry = f"tensor on storage {storage.key}"
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
            raise self._reader.error(f"{entry}: sizes and strides must be tuples")
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride) or len(size) > _MAX_NDIM:
            raise self._reader.error(f"{entry}: {len(size)} sizes but {len(stride)} strides")
        if not all(_is_int(x) for x in (offset, *size, *stride)):
            raise self._reader.error(f"{entry}: offset, sizes and strides must be integers")
        if offset < 0 or min(size, default=0) < 0:
            raise self._reader.error(f"{entry}: negative offset or size")
        if min(stride, default=0) < 0:
            raise self._reader.error(f"{entry}: negative strides are not supported")
        view = _View(storage, offset, size, stride)
        if view.end > storage.numel or offset > storage.numel:
            raise self._reader.error(
                f"{entry}: the view (offset {_num(offset)}, {_num(view.count)} elements) "
                f"reaches element {_num(max(view.end, offset))} of a storage of "
                f"{_num(storage.numel)}"
            )
        return view


class _Reader:
    """The zip archive of one checkpoint, with every entry checked before it is read."""

    def __init__(self, path: str, archive: zipfile.ZipFile):
        self.path, self.archive = path, archive
        self.file_size = os.path.getsize(path)
        self._compressed_read = 0
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointFileError(
                f"{path}: zip archive has no data.pkl; not a PyTorch checkpoint"
            )
        self.root = pickles[0].rsplit("/", 1)[0] if "/" in pickles[0] else ""
        byteorder = f"{self.root}/byteorder"
        if byteorder in names and self.read(byteorder, limit=16).strip() != b"little":
            raise CheckpointFileError(f"{path}: big-endian checkpoints are not supported")
        self.pickle_bytes = self.read(pickles[0], limit=MAX_PICKLE_BYTES)

    def error(self, what: str) -> CheckpointFileError:
        return CheckpointFileError(f"{self.path}: {what}")

    def read(self, name: str, *, size: int | None = None, limit: int | None = None) -> bytes:
        """Entry `name`, whose declared size must be exactly `size` (or at most `limit`)."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise self.error(f"entry {name} is missing") from None
        declared = info.file_size
        if size is not None and declared != size:
            raise self.error(
                f"entry {name} holds {_num(declared)} bytes but its tensors need {_num(size)}"
            )
        if limit is not None and declared > limit:
            raise self.error(f"entry {name} declares {_num(declared)} bytes (limit {_num(limit)})")
        if info.flag_bits & 0x1:
            raise self.error(f"entry {name} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != declared:
                raise self.error(f"stored entry {name} has inconsistent sizes")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if declared > max(_INFLATION_FLOOR, MAX_INFLATION * info.compress_size):
                raise self.error(
                    f"entry {name} would inflate {_num(info.compress_size)} bytes to "
                    f"{_num(declared)} (more than {MAX_INFLATION}x): refused as a zip bomb"
                )
        else:
            raise self.error(
                f"entry {name} uses zip compression method {info.compress_type}; PyTorch "
                "checkpoints are stored or deflated"
            )
        # Entries of a well-formed archive do not overlap, so together they fit in the file.
        self._compressed_read += info.compress_size
        if self._compressed_read > self.file_size:
            raise self.error(f"entry {name} overlaps other entries or lies past the file's end")
        out = bytearray(declared)
        with self.archive.open(info) as f:
            pos = 0
            while pos < declared:  # in chunks: no second full-size buffer
                chunk = f.read(min(declared - pos, 16 << 20))
                if not chunk:
                    raise self.error(f"entry {name} is truncated ({pos} of {declared} bytes)")
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
        return out

    def load(self) -> Any:
        plan = _Unpickler(self, arrays=None)
        plan.load()
        used = [ref for ref in plan.storages.values() if ref.used]
        for ref in plan.storages.values():
            if ref.viewed and ref.numel > ref.used:
                raise self.error(
                    f"storage {ref.key} declares {_num(ref.numel)} elements but its tensors use "
                    f"{_num(ref.used)}; refusing to read what no tensor needs (re-save the "
                    "tensors with .clone() if they are views of larger ones)"
                )
        storage_bytes = sum(ref.numel * ref.dtype.itemsize for ref in used)
        copied = sum(
            math.prod(size) * plan.storages[key].dtype.itemsize
            for (key, offset, size, stride) in plan.views
            if not _View(plan.storages[key], offset, size, stride).whole_storage_in_order
        )
        if copied > MAX_COPY_FACTOR * storage_bytes + _COPY_FLOOR:
            raise self.error(
                f"its tensors would expand {_num(storage_bytes)} bytes of storage into "
                f"{_num(copied)} bytes of copies (overlapping or broadcast views)"
            )
        arrays = {}
        for ref in used:
            raw = self.read(f"{self.root}/data/{ref.key}", size=ref.numel * ref.dtype.itemsize)
            arrays[ref.key] = np.frombuffer(raw, dtype=ref.dtype)
        return _Unpickler(self, arrays=arrays).load()


def load_torch_file(path: str) -> Any:
    """Unpickles a zip-format torch checkpoint; tensors come back as NumPy arrays.

    Tensors that are a whole storage in order share its buffer (tied weights are one array);
    other views are copied. Raises CheckpointFileError (a ValueError) naming the file for files
    that are not zip-format torch checkpoints (for instance the pre-1.6 legacy format), and for
    malformed, truncated or crafted ones.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"{path} is not a zip-format PyTorch checkpoint (torch >= 1.6 `torch.save`); re-save it "
            "with a recent torch, or convert it to safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            return _Reader(path, archive).load()
    except (CheckpointFileError, MemoryError):
        raise
    except Exception as e:  # zipfile, zlib, pickle and NumPy errors on malformed input
        try:
            detail = str(e)
        except Exception:  # e.g. an over-long integer in the message
            detail = ""
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        raise CheckpointFileError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {detail})"
        ) from None
