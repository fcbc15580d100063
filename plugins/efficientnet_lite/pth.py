"""Read PyTorch ``torch.save`` files into NumPy arrays, without PyTorch.

Two on-disk formats exist:

* the **legacy** format (``_use_new_zipfile_serialization=False``, and every file saved by
  PyTorch < 1.6): a sequence of pickles — the magic number ``0x1950a86a20f9469cfc6c``,
  the protocol version ``1001``, a dict of system info (endianness, type sizes), the
  object itself (tensors refer to their storages by *persistent id*), the list of storage
  keys — followed, for each key, by an int64 element count and the raw storage bytes;
* the **zip** format (PyTorch >= 1.6): a zip archive holding ``<dir>/data.pkl`` (the
  object pickle) and one file ``<dir>/data/<key>`` per storage.

Both share the object pickle, in which a tensor is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``.
The unpickler here is restricted: the only globals it resolves are
``collections.OrderedDict``, the two tensor-rebuild functions and the ``torch.*Storage``
type names, all mapped to functions of this module. Anything else (a pickled
``nn.Module``, ``os.system``, ...) is refused with a ``ValueError`` before it can run, so
reading an untrusted file executes no code from it.

Every tensor comes back as its own C-contiguous NumPy array (views are copied out of
their storage, so two tensors never share memory). ``bfloat16`` tensors become
``float32`` (NumPy has no bfloat16); every other dtype is kept.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

__all__ = ["load", "load_state_dict"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
#: A view may expand its storage (stride 0) up to this many elements, and no further.
MAX_EXPANDED_ELEMENTS = 1 << 26
PROTOCOL_VERSION = 1001

#: ``torch.<Name>`` storage types and the NumPy dtype of their elements.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bfloat16",  # stored as 2-byte words, returned as float32
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
    "UntypedStorage": "u1",
}


def _item_size(dtype_name: str) -> int:
    return 2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize


@dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.FloatStorage``-like class inside the pickle."""

    name: str

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A flat buffer of ``numel`` elements; ``data`` is filled once its bytes are read."""

    dtype: str
    numel: int
    data: np.ndarray | None = None
    # For a legacy view storage: (root storage, element offset) — resolved lazily.
    view_of: tuple["_Storage", int] | None = None

    def array(self) -> np.ndarray:
        if self.view_of is not None:
            root, offset = self.view_of
            return root.array()[offset : offset + self.numel]
        if self.data is None:
            raise ValueError("truncated torch file: a tensor's storage bytes are missing")
        return self.data


@dataclass
class _PendingTensor:
    """What ``_rebuild_tensor_v2`` returns while the storages are still unread."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialize(self) -> np.ndarray:
        flat = self.storage.array()
        return _strided_copy(flat, self.offset, self.size, self.stride)


def _strided_copy(flat: np.ndarray, offset: int, size, stride) -> np.ndarray:
    """``flat[offset:]`` seen with ``size``/``stride`` (in elements), bounds-checked, copied."""
    try:
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
        offset = int(offset)
    except (TypeError, ValueError) as error:
        raise ValueError(f"malformed tensor in torch file: size {size!r}, stride {stride!r}") from error
    if len(size) != len(stride):
        raise ValueError(f"malformed tensor in torch file: size {size} and stride {stride} differ in rank")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"malformed tensor in torch file: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.empty(size, dtype=flat.dtype)
    if math.prod(size) > max(flat.size, MAX_EXPANDED_ELEMENTS):
        # Zero strides make a view bigger than its storage; a crafted file could ask for terabytes.
        raise ValueError(f"malformed torch file: a tensor of size {size} from a storage of {flat.size} elements")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise ValueError(
            f"malformed torch file: a tensor of size {size}, stride {stride} at offset {offset} "
            f"reaches element {last} of a storage with only {flat.size} elements"
        )
    base = flat[offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return np.array(view, order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    """``torch._utils._rebuild_tensor`` and ``_rebuild_tensor_v2`` (the extras are ignored)."""
    if not isinstance(storage, _Storage):
        raise ValueError("malformed torch file: a tensor's storage is not a storage reference")
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride))


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
}
for _name in STORAGE_DTYPES:
    _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name)
_ALLOWED_GLOBALS[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")


class _Unpickler(pickle.Unpickler):
    """Resolves only the allowed globals; storages come from ``storage_for``."""

    def __init__(self, file: BinaryIO, storage_for=None):
        super().__init__(file)
        self._storage_for = storage_for

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ValueError(
                f"refusing to load {module}.{name} from the torch file: only tensors, storages and "
                "OrderedDicts are allowed (save a state_dict, not a whole model object)"
            ) from None

    def persistent_load(self, pid):
        if self._storage_for is None:
            raise ValueError("malformed torch file: unexpected persistent id outside the object pickle")
        return self._storage_for(pid)


def _load_pickle(file: BinaryIO, storage_for=None, what: str = "object"):
    try:
        return _Unpickler(file, storage_for).load()
    except ValueError:
        raise
    except Exception as error:  # pickle raises many kinds on malformed input
        raise ValueError(f"malformed torch file: cannot read its {what} pickle ({error})") from error


def _parse_pid(pid) -> tuple[_StorageType, str, int, Any]:
    """(storage type, key, numel, view metadata) of a ``('storage', ...)`` persistent id."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise ValueError(f"malformed torch file: unsupported persistent id {pid!r:.80}")
    storage_type, key, _location, numel = pid[1:5]
    view_metadata = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType):
        raise ValueError(f"malformed torch file: unknown storage type {storage_type!r:.80}")
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"malformed torch file: bad storage size {numel!r:.80}")
    return storage_type, str(key), numel, view_metadata


def _materialize(obj):
    """Replace every pending tensor in a nested dict/list/tuple by its NumPy array."""
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


def _decode(raw: bytes, dtype_name: str, little_endian: bool) -> np.ndarray:
    order = "<" if little_endian else ">"
    if dtype_name == "bfloat16":
        words = np.frombuffer(raw, dtype=order + "u2").astype(np.uint32)
        return (words << 16).view(np.float32)
    dtype = np.dtype(dtype_name).newbyteorder(order) if np.dtype(dtype_name).itemsize > 1 else np.dtype(dtype_name)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------------------- legacy format


def _load_legacy(file: BinaryIO, source: str):
    try:
        magic = _Unpickler(file).load()
    except Exception as error:
        raise ValueError(f"{source} is not a PyTorch file (no torch.save header: {error})") from error
    if magic != MAGIC_NUMBER:
        raise ValueError(f"{source} is not a PyTorch file (its first pickle is not the torch.save magic number)")
    version = _load_pickle(file, what="protocol version")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"{source}: unsupported torch.save protocol version {version!r} (expected {PROTOCOL_VERSION})")
    sys_info = _load_pickle(file, what="system info")
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    storages: dict[str, _Storage] = {}

    def storage_for(pid) -> _Storage:
        storage_type, key, numel, view_metadata = _parse_pid(pid)
        if key not in storages:
            storages[key] = _Storage(storage_type.dtype, numel)
        root = storages[key]
        if view_metadata is None:
            return root
        try:
            view_key, view_offset, view_size = view_metadata
        except (TypeError, ValueError):
            raise ValueError(f"malformed torch file: bad storage view {view_metadata!r:.80}") from None
        if view_key not in storages:
            storages[view_key] = _Storage(root.dtype, int(view_size), view_of=(root, int(view_offset)))
        return storages[view_key]

    obj = _load_pickle(file, storage_for, what="object")
    keys = _load_pickle(file, what="storage key list")
    if not isinstance(keys, list):
        raise ValueError("malformed torch file: the storage key list is not a list")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None or storage.view_of is not None:
            raise ValueError(f"malformed torch file: storage {key!r} is listed but never used")
        header = file.read(8)
        if len(header) != 8:
            raise ValueError(f"truncated torch file: storage {key!r} is missing")
        (count,) = struct.unpack("<q" if little_endian else ">q", header)
        if count != storage.numel:
            raise ValueError(f"malformed torch file: storage {key!r} holds {count} elements, expected {storage.numel}")
        nbytes = count * _item_size(storage.dtype)
        raw = file.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"truncated torch file: storage {key!r} has {len(raw)} of its {nbytes} bytes")
        storage.data = _decode(raw, storage.dtype, little_endian)
    return _materialize(obj)


# ------------------------------------------------------------------------------- zip format


def _load_zip(path: str):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a PyTorch file: {error}") from error
    with archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") == 1]
        if not pickles:
            raise ValueError(f"{path} is a zip file but not a PyTorch one (it has no <dir>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if prefix + "byteorder" in names:
            little_endian = archive.read(prefix + "byteorder").strip() != b"big"
        loaded: dict[str, _Storage] = {}

        def storage_for(pid) -> _Storage:
            storage_type, key, numel, _view = _parse_pid(pid)
            if key not in loaded:
                member = f"{prefix}data/{key}"
                nbytes = numel * _item_size(storage_type.dtype)
                try:
                    with archive.open(member) as stream:
                        raw = stream.read(nbytes)  # no more than it should hold, whatever it unpacks to
                except KeyError:
                    raise ValueError(f"malformed torch file: {member} is missing from {path}") from None
                if len(raw) < nbytes:
                    raise ValueError(f"truncated torch file: {member} has {len(raw)} of its {nbytes} bytes")
                loaded[key] = _Storage(storage_type.dtype, numel, _decode(raw[:nbytes], storage_type.dtype, little_endian))
            return loaded[key]

        with archive.open(pickles[0]) as data_pkl:
            obj = _load_pickle(io.BytesIO(data_pkl.read()), storage_for, what="object")
    return _materialize(obj)


# ------------------------------------------------------------------------------------- API


def load(path: str | os.PathLike) -> Any:
    """The object saved in a ``torch.save`` file, with every tensor as a NumPy array."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as file:
        if not file.read(1).startswith(b"\x80") and _is_tar(path):
            raise ValueError(f"{path} uses the tar format of PyTorch < 0.4, which vizkit cannot read")
        file.seek(0)
        return _load_legacy(file, path)


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict saved by ``torch.save(model.state_dict(), path)``."""
    obj = load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a state dict")
    bad = [key for key, value in obj.items() if not (isinstance(key, str) and isinstance(value, np.ndarray))]
    if bad:
        raise ValueError(
            f"{os.fspath(path)} is not a flat state dict: {bad[0]!r} does not map a name to a tensor"
        )
    return dict(obj)
