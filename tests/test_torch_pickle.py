"""The allow-list .pth reader: it reads what torch.save writes, as torch.load does, and refuses
what a crafted file could make it do (run code, read past a storage, set attributes)."""

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vision_ft
from vision_ft.weights.sources import WeightSourceError
from vision_ft.weights.torch_pickle import UnsafePickleError, load_torch_state_dict


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pth_reader_matches_torch_load(tmp_path, zip_format):
    state = {
        "w": torch.randn(4, 3).t(),  # non-contiguous
        "view": torch.arange(10.0)[3:7],  # storage offset
        "half": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "steps": torch.tensor(7),
        "every_third": torch.arange(12.0)[1::3],
        "permuted": torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1),  # NCHW kernel viewed as NHWC
        "expanded": torch.tensor([2.5]).expand(3, 2),  # zero strides over a 1-element storage
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "ckpt.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_state_dict(path)
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(loaded[key].astype(np.float32), tensor.float().numpy())


class _CraftedStorage:
    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float32)


class _CraftedTensor:
    """Pickles as torch.save pickles a tensor, but with whatever offset, size and stride it is given."""

    def __init__(self, storage: _CraftedStorage, offset, size, stride):
        self.rebuild_args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.rebuild_args


class _CraftedPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _CraftedStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.values.size)
        return None


def _write_crafted_pth(path: Path, storage: _CraftedStorage, **tensors: _CraftedTensor) -> Path:
    """Lay out a zip-format .pth as torch.save does, with one storage shared by all ``tensors``."""
    pickled = io.BytesIO()
    _CraftedPickler(pickled, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled.getvalue())
        archive.writestr("archive/data/0", storage.values.tobytes())
        archive.writestr("archive/version", "3\n")
    return path


def test_crafted_pth_with_valid_layouts_loads_as_torch_does(tmp_path):
    storage = _CraftedStorage(np.arange(1.0, 7.0))
    path = _write_crafted_pth(
        tmp_path / "ok.pth",
        storage,
        transposed=_CraftedTensor(storage, 1, (2, 2), (1, 2)),
        broadcast=_CraftedTensor(storage, 5, (3,), (0,)),
        last_element=_CraftedTensor(storage, 5, (), ()),
        empty_past_the_end=_CraftedTensor(storage, 6, (0, 4), (4, 1)),
    )
    expected = torch.load(path, weights_only=True)
    loaded = load_torch_state_dict(path)
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(loaded[key], tensor.numpy(), err_msg=key)
    np.testing.assert_array_equal(loaded["transposed"], [[2.0, 4.0], [3.0, 5.0]])
    assert loaded["transposed"].flags.c_contiguous


@pytest.mark.parametrize(
    "offset, size, stride, problem",
    [
        (0, (64,), (1,), "reaches element 63 but its storage holds 1"),  # used to copy heap memory
        (0, (400_000_000,), (1,), "reaches element 399999999"),  # used to segfault
        (0, (1, 2), (1, 1), "reaches element 1"),
        (1, (1,), (1,), "reaches element 1"),
        (1, (), (), "reaches element 1"),
        (-1, (1,), (1,), "negative"),
        (0, (1,), (-1,), "negative"),
        (0, (-1,), (1,), "negative"),
        (0, (1,), (1, 1), "different lengths"),
        (0, (1.5,), (1,), "must be integers"),
        # a 1.5 KB file whose copy asked for 64 GiB (torch.load keeps the expansion as a view)
        (0, (2**34,), (0,), "copy out more than 16777218 elements, but the file holds 1"),
    ],
    ids=[
        "heap_read",
        "segfault_size",
        "second_dim_overruns",
        "offset_overruns",
        "scalar_overruns",
        "negative_offset",
        "negative_stride",
        "negative_size",
        "rank_mismatch",
        "float_size",
        "expansion_bomb",
    ],
)
def test_pth_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, problem):
    storage = _CraftedStorage([1.0])
    path = _write_crafted_pth(
        tmp_path / "crafted.pth", storage, **{"conv1.weight": _CraftedTensor(storage, offset, size, stride)}
    )
    with pytest.raises(pickle.UnpicklingError, match="tensor 'conv1.weight'") as err:
        load_torch_state_dict(path)
    assert problem in str(err.value)
    with pytest.raises(WeightSourceError, match="could not be read") as err:
        vision_ft.create_model("resnet18", pretrained=path)
    assert str(path) in str(err.value) and "conv1.weight" in str(err.value)


class _TensorWithState(_CraftedTensor):
    """Adds pickle's BUILD step, which sets attributes on the rebuilt object, as a crafted file can."""

    def __init__(self, storage: _CraftedStorage, offset, size, stride, state: dict):
        super().__init__(storage, offset, size, stride)
        self.state = state

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.rebuild_args, self.state


def test_pth_cannot_set_attributes_on_tensors(tmp_path):
    # _rebuild_parameter (allowed, and an identity) set as the tensor's own _check_layout used to switch
    # the bounds check off, so the 8-element view read 4 floats of heap past the storage
    storage = _CraftedStorage([1.0, 2.0, 3.0, 4.0])
    bypass = {"_check_layout": torch._utils._rebuild_parameter}
    path = _write_crafted_pth(
        tmp_path / "crafted.pth",
        storage,
        **{"conv1.weight": _TensorWithState(storage, 0, (8,), (1,), bypass)},
    )
    with pytest.raises(UnsafePickleError, match="sets attributes on a LazyTensor"):
        load_torch_state_dict(path)
    with pytest.raises(WeightSourceError, match="refused"):
        vision_ft.create_model("resnet18", pretrained=path)


class _ViewPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _CraftedStorage):  # the last entry: (view key, offset, size) into storage "0"
            return ("storage", torch.FloatStorage, "0", "cpu", obj.values.size, ("1", 2, 2))
        return None


def test_legacy_pth_storage_view_is_refused(tmp_path):
    # pre-1.6 files could put a tensor on a view of a storage; its offset counts from the view's start,
    # which was ignored, so the tensor silently read from the storage's start
    storage = _CraftedStorage([1.0, 2.0, 3.0, 4.0])
    path = tmp_path / "legacy_view.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        _ViewPickler(f, protocol=2).dump({"w": _CraftedTensor(storage, 0, (2,), (1,))})
        pickle.dump(["0"], f, protocol=2)
        f.write(np.int64(4).tobytes() + storage.values.tobytes())
    with pytest.raises(pickle.UnpicklingError, match="storage 0 is a view into another storage"):
        load_torch_state_dict(path)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pth_reader_never_executes_code(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(
        {"weight": torch.zeros(2), "x": _RunsCode(marker)}, path, _use_new_zipfile_serialization=zip_format
    )
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_torch_state_dict(path)
    assert not marker.exists()
    with pytest.raises(WeightSourceError, match="refused"):
        vision_ft.create_model("resnet18", pretrained=path)


def test_pth_whose_views_copy_out_far_more_than_the_file_holds_is_refused(tmp_path):
    """Each tensor was checked alone: many views of one storage (or many small expansions) made a
    file of a few MB copy out to any amount of memory (torch.load keeps them as views)."""
    storage = _CraftedStorage(np.ones(2**20))
    views = {f"w{i}": _CraftedTensor(storage, 0, (2**20,), (1,)) for i in range(40)}
    path = _write_crafted_pth(tmp_path / "views.pth", storage, **views)
    with pytest.raises(
        pickle.UnpicklingError, match=r"copy out more than .* elements, but the file holds 1048576"
    ):
        load_torch_state_dict(path)
    tied = _write_crafted_pth(  # two names for one weight, as tied embeddings save
        tmp_path / "tied.pth", storage, **{name: views[name] for name in ("w0", "w1")}
    )
    assert set(load_torch_state_dict(tied)) == {"w0", "w1"}


def test_pth_storage_that_unpacks_beyond_its_declared_size_is_refused(tmp_path):
    """A storage entry was unpacked whole, unchecked: 40 KB of deflated zeros in a .pth made the
    reader hold 40 MB for a 4-element tensor (any file size times about a thousand)."""
    path = tmp_path / "small.pth"
    torch.save({"w": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    [storage_name] = [name for name in entries if name.endswith("/data/0")]
    for name, payload, problem in (
        ("bomb.pth", bytes(40 * 2**20), "unpacks to 41943040 bytes, but its record declares 16"),
        ("deflated.pth", bytes(16), None),  # the declared size, deflated: not torch's way, no bomb
    ):
        crafted = tmp_path / name
        with zipfile.ZipFile(crafted, "w") as archive:
            for entry, data in entries.items():
                compression = zipfile.ZIP_DEFLATED if entry == storage_name else zipfile.ZIP_STORED
                archive.writestr(entry, payload if entry == storage_name else data, compression)
        if problem is None:
            np.testing.assert_array_equal(load_torch_state_dict(crafted)["w"], np.zeros(4, np.float32))
        else:
            with pytest.raises(pickle.UnpicklingError, match=problem):
                load_torch_state_dict(crafted)


def test_legacy_pth_storage_declaring_more_than_the_file_holds_is_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    header = (4).to_bytes(8, "little", signed=True)  # the storage's element count, before its data
    assert raw.count(header) == 1
    for numel in (2**40, -1):
        crafted = tmp_path / f"legacy_{numel}.pth"
        crafted.write_bytes(raw.replace(header, numel.to_bytes(8, "little", signed=True)))
        with pytest.raises(pickle.UnpicklingError, match=f"declares {numel} elements"):
            load_torch_state_dict(crafted)
