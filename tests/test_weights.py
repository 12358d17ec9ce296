"""Checkpoint reading and timm's loading semantics, exercised on ResNet-18 at small inputs."""

import argparse
import collections
import copy
import io
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import vision_ft
from tests.parity import (
    TOLERANCE,
    jax_outputs,
    perturbed_timm_model,
    relative_error,
    save_checkpoint,
    torch_outputs,
)
from vision_ft.weights import sources
from vision_ft.weights.adapt import adapt_input_conv
from vision_ft.weights.mapping import WeightLoadError
from vision_ft.weights.sources import WeightSourceError
from vision_ft.weights.torch_pickle import UnsafePickleError, load_torch_state_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory):
    ref = perturbed_timm_model("resnet18")
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("ckpt"))


def _batch(in_chans, size=48):
    return np.random.default_rng(1).standard_normal((2, in_chans, size, size)).astype(np.float32)


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


def test_timm_training_checkpoint_loads_its_weights(tmp_path, resnet18_ckpt, monkeypatch):
    """timm's train.py saves model_best.pth.tar: the weights beside the optimizer's state, the run's
    argparse.Namespace and an EMA. The suffix was unknown and the Namespace refused as unsafe."""
    ref = copy.deepcopy(resnet18_ckpt[0])  # the fixture's model serves other tests
    optimizer = torch.optim.AdamW(ref.parameters())
    ref(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    ema_state = {key: torch.zeros_like(value) for key, value in ref.state_dict().items()}
    args = argparse.Namespace(model="resnet18", lr=0.1, sched="cosine", input_size=None, mean=(0.5,))
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 3, "arch": "resnet18", "state_dict": ref.state_dict(),
            "optimizer": optimizer.state_dict(), "version": 2, "args": args,
            "state_dict_ema": ema_state, "metric": 71.5,
        },
        path,
    )  # fmt: skip
    read = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(
        zipfile.ZipFile, "read", lambda self, name: read.append(name) or real_read(self, name)
    )
    loaded = load_torch_state_dict(path)
    monkeypatch.undo()
    assert set(loaded) == set(ref.state_dict())
    np.testing.assert_array_equal(loaded["fc.weight"], ref.fc.weight.detach().numpy())
    # only the weights' storages are read, not the optimizer's or the EMA's
    with zipfile.ZipFile(path) as archive:
        stored = [name for name in archive.namelist() if "/data/" in name]
    read_storages = [name for name in read if "/data/" in name]
    assert len(read_storages) == len(ref.state_dict()) < len(stored)
    assert loaded["fc.weight"].flags.writeable  # copies, not views of the file's read-only buffer
    # the pre-1.6 format steps over the storages it does not need
    legacy = tmp_path / "legacy.pth.tar"
    torch.save(torch.load(path, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    for key, value in load_torch_state_dict(legacy).items():
        np.testing.assert_array_equal(value, loaded[key], err_msg=key)
    plain = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), plain)
    _assert_same_resnet18(path, plain)
    # what a Namespace holds is still unpickled under the allow-list
    marker = tmp_path / "pwned"
    torch.save({"state_dict": ref.state_dict(), "args": argparse.Namespace(x=_RunsCode(marker))}, path)
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_pth_and_safetensors_load_identically(tmp_path, resnet18_ckpt):
    ref, st_path = resnet18_ckpt
    pth_path = tmp_path / "ckpt.pth"
    torch.save(ref.state_dict(), pth_path)
    _assert_same_resnet18(st_path, pth_path)


def _assert_same_resnet18(path: Path, other: Path) -> None:
    """resnet18 from either checkpoint file gives bit-identical logits."""
    x = _batch(3)
    a = jax_outputs(vision_ft.create_model("resnet18", pretrained=path), x)
    b = jax_outputs(vision_ft.create_model("resnet18", pretrained=other), x)
    np.testing.assert_array_equal(a[0], b[0])


def test_safetensors_loading_needs_no_torch(resnet18_ckpt):
    _, path = resnet18_ckpt
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import vision_ft
        m = vision_ft.create_model("resnet18", pretrained={str(path)!r})
        print(m.num_classes)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "1000"


@pytest.mark.parametrize("in_chans", [1, 4, 13])
def test_in_chans_adapted_like_timm(tmp_path, resnet18_ckpt, in_chans):
    _, path = resnet18_ckpt
    ref = timm.create_model(
        "resnet18", in_chans=in_chans, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    ours = vision_ft.create_model("resnet18", pretrained=path, in_chans=in_chans)
    x = _batch(in_chans)
    for mine, theirs in zip(jax_outputs(ours, x), torch_outputs(ref, x), strict=True):
        assert relative_error(mine, theirs) <= TOLERANCE
    assert len(ours.pretrained_cfg.mean) == in_chans


def test_new_num_classes_drops_classifier(resnet18_ckpt):
    ref, path = resnet18_ckpt
    ours = vision_ft.create_model("resnet18", pretrained=path, num_classes=7)
    x = _batch(3)
    logits, pre = jax_outputs(ours, x)
    assert logits.shape == (2, 7)
    assert relative_error(pre, torch_outputs(ref, x)[1]) <= TOLERANCE
    headless = vision_ft.create_model("resnet18", pretrained=path, num_classes=0)
    assert headless.fc is None
    np.testing.assert_allclose(jax_outputs(headless, x)[0], pre, rtol=1e-6)


def test_num_classes_follows_checkpoint_when_unset(tmp_path):
    ref = perturbed_timm_model("resnet18", num_classes=3)
    path = save_checkpoint(ref, tmp_path)
    assert vision_ft.create_model("resnet18", pretrained=path).num_classes == 3


def test_mismatched_checkpoint_lists_every_problem(tmp_path, resnet18_ckpt):
    ref, _ = resnet18_ckpt
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    del state["layer1.0.conv1.weight"], state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(3)
    state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    # a kernel of the wrong rank used to stop the listing with numpy's "axes don't match array"
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128)
    state["fc.weight"] = torch.zeros(1000, 512, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightLoadError) as err:
        vision_ft.create_model("resnet18", pretrained=path)
    message = str(err.value)
    for fragment in (
        "layer1.0.conv1.kernel", "layer4.1.bn2.var", "extra.weight", "layer2.0.conv2.weight",
        "layer3.0.conv1.weight: checkpoint (256, 128), 2-D where the model's (3, 3, 128, 256) kernel",
        "fc.weight: checkpoint (1000, 512, 1, 1), 4-D where the model's (512, 1000) kernel takes a 2-D",
    ):  # fmt: skip
        assert fragment in message
    assert "missing (2)" in message and "unexpected (1)" in message and "shape mismatch (3)" in message


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    path = save_checkpoint(perturbed_timm_model("resnet18"), tmp_path)
    with pytest.raises(WeightLoadError, match="missing") as err:
        vision_ft.create_model("resnet50", pretrained=path)
    # one line, six names a kind: it listed every one of 200-odd tensors over 5,000 characters
    message = str(err.value)
    assert "\n" not in message and len(message) < 2000 and " more" in message, message


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(WeightSourceError, match="no such file"):
        vision_ft.create_model("resnet18", pretrained=tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightSourceError, match="could not be read"):
        vision_ft.create_model("resnet18", pretrained=junk)
    run = tmp_path / "run"  # a vision-ft run directory, which --pretrained takes as run:DIR
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(WeightSourceError, match=f"checkpoint {run} is a directory, not a weights file; for"):
        vision_ft.create_model("resnet18", pretrained=run)  # it said the directory does not exist
    truncated = tmp_path / "trunc.pth"
    torch.save({"w": torch.randn(100)}, truncated, _use_new_zipfile_serialization=False)
    truncated.write_bytes(truncated.read_bytes()[:-50])
    with pytest.raises(WeightSourceError, match="could not be read"):
        vision_ft.create_model("resnet18", pretrained=truncated)


def test_damaged_offline_package_is_a_source_error(tmp_path, monkeypatch):
    # the package's file was read without read_checkpoint's wrapping: a damaged install gave a traceback
    damaged = tmp_path / "efficientnet_lite0.pth"
    damaged.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(sources, "offline_package_checkpoint", lambda name: damaged)
    with pytest.raises(WeightSourceError, match=f"checkpoint {damaged} could not be read"):
        vision_ft.create_model("tf_efficientnet_lite0", pretrained=True)


def test_adapt_input_conv_refuses_stems_it_cannot_adapt():
    rgb = np.ones((8, 3, 3, 3), np.float32)
    assert adapt_input_conv(3, rgb) is rgb
    assert adapt_input_conv(5, rgb).shape == (8, 5, 3, 3)
    with pytest.raises(
        WeightLoadError, match=r"^file a\.pth: stem\.weight has shape \(8, 4, 3, 3\), a 4-channel"
    ):
        adapt_input_conv(3, np.ones((8, 4, 3, 3)), name="stem.weight", source="file a.pth")
    with pytest.raises(WeightLoadError, match="5-channel stem.* 1 input channels"):
        adapt_input_conv(1, np.ones((8, 5, 3, 3)), name="stem.weight")
    for bad_rank in (np.ones(8), np.ones((8, 3)), np.ones((8, 3, 3, 3, 1))):
        with pytest.raises(
            WeightLoadError, match=re.escape(f"stem.weight has shape {bad_rank.shape}; expected a 4-D")
        ):
            adapt_input_conv(3, bad_rank, name="stem.weight")


@pytest.mark.parametrize("stem_shape", [(64, 4, 7, 7), (64,)], ids=["four_band", "rank_1"])
def test_unadaptable_stem_in_checkpoint_is_a_load_error(tmp_path, resnet18_ckpt, stem_shape):
    ref, _ = resnet18_ckpt
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["conv1.weight"] = torch.zeros(stem_shape)
    path = tmp_path / "stem.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightLoadError) as err:
        vision_ft.create_model("resnet18", pretrained=path)
    message = str(err.value)
    assert str(path) in message and "conv1.weight" in message and str(stem_shape) in message


def test_cli_reports_unloadable_checkpoints_in_one_line(tmp_path):
    four_band = tmp_path / "four_band.safetensors"
    save_file({"conv_stem.weight": torch.zeros(32, 4, 3, 3)}, str(four_band))
    storage = _CraftedStorage([1.0])
    overreaching = _write_crafted_pth(
        tmp_path / "overreaching.pth",
        storage,
        **{"conv_stem.weight": _CraftedTensor(storage, 0, (64,), (1,))},
    )
    for path, fragment in ((four_band, "(32, 4, 3, 3)"), (overreaching, "reaches element 63")):
        out = subprocess.run(
            [sys.executable, "-m", "vision_ft.cli", "classify", "--pretrained", str(path)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, out.stderr
        assert (
            str(path) in error_lines[0]
            and "conv_stem.weight" in error_lines[0]
            and fragment in error_lines[0]
        )


def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, Path | str]) -> None:
    """Lay out files as huggingface_hub's cache does, so an offline download finds them."""
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, Path):
            target.write_bytes(content.read_bytes())
        else:
            target.write_text(content)


def test_hf_hub_spec_offline_from_cache(tmp_path, resnet18_ckpt, monkeypatch):
    _, path = resnet18_ckpt
    cache = tmp_path / "hub"
    config = '{"pretrained_cfg": {"crop_pct": 0.9, "interpolation": "bilinear", "num_classes": 1000}}'
    _fake_hub_cache(cache, "timm/resnet18.tv_in1k", {"model.safetensors": path, "config.json": config})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model = vision_ft.create_model("resnet18", pretrained="hf-hub:timm/resnet18.tv_in1k")
    assert model.pretrained_cfg.interpolation == "bilinear" and model.pretrained_cfg.crop_pct == 0.9
    np.testing.assert_array_equal(
        jax_outputs(model, _batch(3))[0],
        jax_outputs(vision_ft.create_model("resnet18", pretrained=path), _batch(3))[0],
    )
    with pytest.raises(WeightSourceError, match="could not fetch weights hf-hub:timm/resnet18.a1_in1k"):
        vision_ft.create_model("resnet18", pretrained=True)


def test_list_models():
    names = vision_ft.list_models()
    for family_member in (
        "resnet50d",
        "efficientnet_b3",
        "tf_efficientnet_lite4",
        "convnext_large",
        "vit_base_patch16_384",
        "vit_small_patch14_reg4_dinov2",
    ):
        assert family_member in names
    assert vision_ft.list_models("resnet*") == [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet50d",
        "resnet101",
        "resnet152",
    ]
    assert "resnet50.a1_in1k" in vision_ft.list_models("resnet50", pretrained=True)
