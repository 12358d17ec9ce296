"""Checkpoint reading and timm's loading semantics, exercised on ResNet-18 at small inputs."""

import argparse
import copy
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
from tests.test_torch_pickle import _CraftedStorage, _CraftedTensor, _RunsCode, _write_crafted_pth
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


def test_bf16_safetensors_read_as_torch_wrote_them(tmp_path):
    """Hub repos may ship bf16 weights only; safetensors' numpy reader knows bfloat16 by the name
    ml_dtypes gives numpy."""
    weights = {"w": torch.randn(3, 2).bfloat16(), "b": torch.ones(2)}
    path = tmp_path / "bf16.safetensors"
    save_file(weights, str(path))
    state = sources.read_checkpoint(path)
    assert (str(state["w"].dtype), state["b"].dtype) == ("bfloat16", np.float32)
    np.testing.assert_array_equal(state["w"].astype(np.float32), weights["w"].float().numpy())


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


def test_a_headless_checkpoint_gets_a_new_head(tmp_path, resnet18_ckpt):
    """Weights saved without a classifier (DINOv2's, a num_classes=0 export) were refused as missing
    fc.kernel and fc.bias where a head was asked for; timm starts a new one."""
    ref, _ = resnet18_ckpt
    path = tmp_path / "headless.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("fc.")}, path)
    ours = vision_ft.create_model("resnet18", pretrained=str(path), num_classes=5)
    x = _batch(3)
    logits, pre = jax_outputs(ours, x)
    assert logits.shape == (2, 5)
    assert relative_error(pre, torch_outputs(ref, x)[1]) <= TOLERANCE


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


def test_hf_hub_tag_without_its_config_json_gets_the_tags_preprocessing(tmp_path, resnet18_ckpt, monkeypatch):
    """A cache holding only the weights (or config.json failing to download) left the default tag's
    interpolation, crop and statistics on the model, though the registry knows the tag's."""
    _, path = resnet18_ckpt
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "timm/resnet18.tv_in1k", {"model.safetensors": path})
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model = vision_ft.create_model("resnet18", pretrained="hf-hub:timm/resnet18.tv_in1k")
    expected = vision_ft.create_model("resnet18.tv_in1k", pretrained=False).pretrained_cfg
    assert (model.pretrained_cfg.interpolation, model.pretrained_cfg.crop_pct) == ("bilinear", 0.875)
    assert model.pretrained_cfg == expected


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


def test_unreachable_hub_is_asked_once_then_the_cache(tmp_path, resnet18_ckpt, monkeypatch):
    """A network failure on the first weights file (retried for ~25 s by huggingface_hub) is not
    repeated for the next: that one is looked up in the local cache only."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _, path = resnet18_ckpt
    calls = []

    def download(repo_id, filename, *, local_files_only=False):
        calls.append((filename, local_files_only))
        if filename == "pytorch_model.bin" and local_files_only:
            return str(path)  # in the cache from an earlier download
        if filename == "config.json" and local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise LocalEntryNotFoundError("cannot reach the hub") from ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    source = sources.from_hub("timm/resnet18.a1_in1k")
    assert calls == [
        ("model.safetensors", False),
        ("pytorch_model.bin", True),
        ("config.json", True),
    ]
    assert "pytorch_model.bin" in source.description and source.cfg_overrides == {}


def test_cli_prints_huggingface_hub_retries_as_one_line(tmp_path):
    """huggingface_hub logs through its own handler; the CLI must not print each line again through
    the root logger's (its retry warnings ran to twenty doubled lines offline), and its retries
    become one line (there were eleven for one file, even printed once)."""
    script = textwrap.dedent(
        """
        import sys
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
        from huggingface_hub.utils import logging as hf_logging

        def download(repo_id, filename, *, local_files_only=False):
            if local_files_only:
                raise LocalEntryNotFoundError("not in the cache")
            hub_http = hf_logging.get_logger("huggingface_hub.utils._http")
            for n in (1, 2, 3):  # as huggingface_hub words its retries of an unreachable hub
                hub_http.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://x")
                hub_http.warning(f"Retrying in {n}s [Retry {n}/5].")
            raise LocalEntryNotFoundError("cannot reach the hub") from ConnectionError("no network")

        huggingface_hub.hf_hub_download = download
        from vision_ft.cli import main

        sys.argv = ["vision-ft", "classify", "--pretrained", "hf-hub:timm/resnet18.a1_in1k"]
        main()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert out.returncode == 2, out.stderr
    # the hub asked once, then the cache; its six retry lines are one of ours
    assert "Retrying in" not in out.stderr and "thrown while requesting" not in out.stderr, out.stderr
    told = "hf-hub:timm/resnet18.a1_in1k: [Errno -2] Name or service not known; huggingface_hub is retrying"
    assert out.stderr.count(told) == 1, out.stderr
    assert (
        "could not fetch weights hf-hub:timm/resnet18.a1_in1k (LocalEntryNotFoundError: cannot reach"
        in out.stderr
    )
