import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.models import get_pretrained_cfg

import vision_ft
from tests.parity import (
    assert_models_match,
    assert_parity,
    assert_pretrained_cfg_matches_timm,
    assert_structure_matches,
    perturbed_timm_model,
    register_shortened,
    save_checkpoint,
)
from vision_ft.train.groups import layer_ids, param_paths

NAMES = [
    "convnext_atto",
    "convnext_femto",
    "convnext_pico",
    "convnext_nano",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
]
SMALL = "convnext_atto"  # conv_mlp variant: 1x1-conv MLP
IMG = 64  # 16 px after the stem, 2 px in the last stage


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # timm's init and small ops run several times faster on one thread when the cores are shared
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _report(label, errors):
    print(f"\n{label}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))


@pytest.mark.parametrize("name", NAMES)
def test_convnext_matches_timm(name, tmp_path, monkeypatch):
    if name in ("convnext_base", "convnext_large"):
        # 89M / 198M parameters: every block checked on shapes, the numbers on one block per stage
        assert assert_structure_matches(name, timm_kwargs={}) > 36 * 8
        register_shortened(monkeypatch, name, depths=(1, 1, 1, 1))
        errors = assert_parity(
            name, tmp_path, img_size=IMG, timm_kwargs=dict(depths=(1, 1, 1, 1)), ours_kwargs={}
        )
    else:
        errors = assert_parity(name, tmp_path, img_size=IMG)
    _report(name, errors)


def test_odd_input_size_matches_timm(tmp_path):
    # 72 px: the 2x2 stride-2 downsample conv drops the last row/column at 9 px -> 4 px (VALID)
    errors = assert_parity(SMALL, tmp_path, img_size=72, batch=1)
    _report(f"{SMALL} 72px", errors)


def test_model_names_and_pretrained_cfgs():
    assert set(vision_ft.list_models("convnext_*")) == set(NAMES)
    for name in NAMES:
        assert_pretrained_cfg_matches_timm(name)
        assert get_pretrained_cfg(name).interpolation == "bicubic"


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_from_rgb_checkpoint(in_chans, tmp_path):
    ckpt = save_checkpoint(perturbed_timm_model(SMALL), tmp_path)
    ref = timm.create_model(
        SMALL, in_chans=in_chans, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt))
    ).eval()
    ours = vision_ft.create_model(SMALL, pretrained=ckpt, in_chans=in_chans)
    assert ours.stem[0].kernel.shape == (4, 4, in_chans, 40)
    errors = assert_models_match(ref, ours, img_size=IMG, label=f"in_chans={in_chans}")
    _report(f"{SMALL} in_chans={in_chans}", errors)


def test_new_classes_and_reset_classifier(tmp_path):
    ref = perturbed_timm_model(SMALL)
    ckpt = save_checkpoint(ref, tmp_path)
    ours = vision_ft.create_model(SMALL, pretrained=ckpt, num_classes=5)
    errors = assert_models_match(ref, ours, img_size=IMG, check_logits=False, label="num_classes=5")
    _report(f"{SMALL} num_classes=5", errors)
    x = np.zeros((2, IMG, IMG, 3), np.float32)
    assert ours(x).shape == (2, 5) and ours.num_classes == 5 and ours.num_features == 320
    ours.reset_classifier(0)
    assert ours.head.fc is None and ours.head.norm is not None
    pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(pre))
    ours.reset_classifier(7)
    assert ours(x).shape == (2, 7) and ours.num_classes == 7


def test_headless_matches_timm(tmp_path):
    # num_classes=0: no classifier, but head.norm stays (timm's forward gives the normed embedding)
    errors = assert_parity(SMALL, tmp_path, img_size=IMG, timm_kwargs=dict(num_classes=0))
    model = nnx.eval_shape(lambda: vision_ft.create_model(SMALL, num_classes=0))
    assert model.head.fc is None and model.num_classes == 0
    _report(f"{SMALL} num_classes=0", errors)


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_matches_timm(coarse):
    from timm.models._manipulate import group_parameters

    ref = timm.create_model(SMALL, num_classes=10)
    ours = nnx.eval_shape(lambda: vision_ft.create_model(SMALL, num_classes=10))  # structure only
    timm_ids = {
        key.rpartition(".")[0] if key.endswith(("weight", "bias")) else key: gid
        for gid, keys in group_parameters(ref, ref.group_matcher(coarse)).items()
        for key in keys
    }
    our_ids = {
        path.rpartition(".")[0] if path.endswith(("kernel", "scale", "bias")) else path: i
        for path, i in layer_ids(param_paths(ours), ours.group_matcher(coarse)).items()
    }
    assert our_ids == timm_ids
    assert our_ids["stem.0"] == 0 and our_ids["head.fc"] == max(our_ids.values())
    if not coarse:
        assert our_ids["stages.1.downsample.1"] == our_ids["stages.1.blocks.0.conv_dw"]


def test_drop_path_schedule_and_train_mode():
    ref = timm.create_model(SMALL, drop_path_rate=0.2)
    ours = vision_ft.create_model(SMALL, drop_path_rate=0.2)
    expected = [float(getattr(b.drop_path, "drop_prob", 0.0)) for s in ref.stages for b in s.blocks]
    rates = [b.drop_path.rate for s in ours.stages for b in s.blocks]
    assert rates == pytest.approx(expected, abs=1e-7)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and len(set(rates)) == len(rates)
    x = np.random.default_rng(0).standard_normal((2, IMG, IMG, 3)).astype(np.float32)
    eval_out = np.asarray(ours(x))
    np.testing.assert_array_equal(eval_out, np.asarray(ours(x)))
    train_out = np.asarray(ours(x, train=True))
    assert train_out.shape == (2, 1000) and np.isfinite(train_out).all()
    assert not np.allclose(train_out, eval_out)
