import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.torch import save_file

import vision_ft
from tests.parity import (
    assert_models_match,
    assert_parity,
    assert_structure_matches,
    perturbed_timm_model,
    register_shortened,
    relative_error,
    save_checkpoint,
)
from vision_ft.models.vit import bicubic_matrix, resample_abs_pos_embed
from vision_ft.train.groups import layer_ids, param_paths
from vision_ft.weights.mapping import WeightLoadError

CLASSIC = [
    f"vit_{size}_patch{patch}_{res}"
    for patch in (16, 32)
    for size in ("tiny", "small", "base", "large")
    for res in (224, 384)
    if not (size == "tiny" and patch == 32)
]
DINOV2 = [f"vit_{size}_patch14{reg}_dinov2" for reg in ("", "_reg4") for size in ("small", "base", "large")]
# smallest inputs with a 2x2 patch grid (patch 32: the same 2x2 at 64 px)
IMG_SIZE = {14: 28, 16: 32, 32: 64}


def _img_size(name: str) -> int:
    return IMG_SIZE[int(re.search(r"_patch(\d+)", name).group(1))]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # timm's init and small ops run several times faster on one thread when the cores are shared
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _drop_checkpoints(request):
    # pytest keeps the last runs' tmp dirs; the large models' checkpoints are 1.2 GB each
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    for path in tmp.glob("*.safetensors") if tmp is not None else ():
        path.unlink()


def _report(label, errors):
    print(f"\n{label}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))


@pytest.mark.parametrize("name", CLASSIC + DINOV2)
def test_vit_matches_timm(name, tmp_path, monkeypatch):
    size = _img_size(name)
    kwargs = dict(img_size=size)
    if "_large_" in name:
        # ViT-L is 1.2 GB a copy: its full 24 blocks are checked on shapes, its numbers on 2 blocks
        assert assert_structure_matches(name, timm_kwargs=kwargs) > 24 * 12
        register_shortened(monkeypatch, name, depth=2)
        errors = assert_parity(
            name, tmp_path, img_size=size, timm_kwargs=dict(kwargs, depth=2), ours_kwargs=kwargs
        )
    else:
        errors = assert_parity(name, tmp_path, img_size=size, timm_kwargs=kwargs)
    _report(name, errors)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_with_classifier(name, tmp_path):
    errors = assert_parity(name, tmp_path, img_size=28, timm_kwargs=dict(img_size=28, num_classes=10))
    _report(f"{name} num_classes=10", errors)


def test_model_names_and_defaults():
    assert set(vision_ft.list_models("vit_*")) == set(CLASSIC + DINOV2)
    model = nnx.eval_shape(lambda: vision_ft.create_model("vit_small_patch14_reg4_dinov2", img_size=28))
    assert model.num_classes == 0 and model.head is None and model.num_features == 384
    assert model.pretrained_cfg.mean == (0.485, 0.456, 0.406)
    tiny = nnx.eval_shape(lambda: vision_ft.create_model("vit_tiny_patch16_384", img_size=32))
    assert tiny.pretrained_cfg.crop_pct == 1.0


@pytest.mark.parametrize(("in_size", "out_size"), [(3, 2), (3, 4), (3, 5), (7, 3), (2, 7), (5, 5), (37, 2)])
@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch(in_size, out_size, antialias):
    x = torch.randn(1, 2, in_size, in_size + 1, generator=torch.Generator().manual_seed(0))
    size = (out_size, out_size + 2)
    ref = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=antialias).numpy()
    rows = bicubic_matrix(in_size, size[0], antialias)
    cols = bicubic_matrix(in_size + 1, size[1], antialias)
    ours = np.einsum("oh,nchw,pw->ncop", rows, x.numpy().astype(np.float64), cols)
    assert np.max(np.abs(ours - ref)) < 1e-5


@pytest.mark.parametrize(
    ("name", "ckpt_size", "new_sizes"),
    [
        ("vit_tiny_patch16_224", 48, [32, 64, (32, 64)]),  # 3x3 grid -> 2x2, 4x4, 2x4; class token kept
        ("vit_small_patch14_reg4_dinov2", 42, [28, 70]),  # no_embed_class: every row is a patch
    ],
)
def test_pos_embed_resampled_like_timm(name, ckpt_size, new_sizes, tmp_path):
    source = perturbed_timm_model(name, img_size=ckpt_size)
    ckpt = save_checkpoint(source, tmp_path)
    for new in new_sizes:
        ref = timm.create_model(
            name, img_size=new, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt))
        )
        ours = vision_ft.create_model(name, pretrained=ckpt, img_size=new)
        ref_pos = ref.pos_embed.detach().numpy()
        assert relative_error(np.asarray(ours.pos_embed[...]), ref_pos) < 1e-6
        hw = (new, new) if isinstance(new, int) else new
        if hw[0] != hw[1]:
            continue  # the parity helper feeds square images
        errors = assert_models_match(ref.eval(), ours, img_size=new, label=f"{name} {ckpt_size}->{new}")
        _report(f"{name} pos_embed {ckpt_size}px -> {new}px", errors)


def test_pos_embed_resample_functional():
    posemb = np.random.default_rng(0).standard_normal((1, 1 + 9, 8)).astype(np.float32)
    same = resample_abs_pos_embed(posemb, (3, 3))
    assert same is posemb
    ref = timm.layers.resample_abs_pos_embed(torch.from_numpy(posemb), [5, 4], antialias=False).numpy()
    ours = resample_abs_pos_embed(posemb, (5, 4), antialias=False)
    assert ours.dtype == np.float32 and np.max(np.abs(ours - ref)) < 1e-5
    assert np.array_equal(ours[:, :1], posemb[:, :1])


@pytest.mark.parametrize("layout", ["distilled", "flat_pos_embed"])
def test_checkpoint_of_another_vit_layout_is_a_load_error(layout, tmp_path):
    # DeiT's distillation token adds a pos_embed row; the filter used to stop on a grid it could not
    # infer with "give old_size", advice for a caller of resample_abs_pos_embed, not for a user
    state = {
        k: v.clone()
        for k, v in perturbed_timm_model("vit_tiny_patch16_224", img_size=32).state_dict().items()
    }
    if layout == "distilled":
        state["dist_token"] = torch.zeros(1, 1, 192)
        state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], state["pos_embed"]], dim=1)
        expected = ("unexpected (1): dist_token", "pos_embed: checkpoint (1, 6, 192) vs model (1, 5, 192)")
    else:
        state["pos_embed"] = state["pos_embed"][0]
        expected = ("pos_embed: checkpoint (5, 192) vs model (1, 5, 192)",)
    path = tmp_path / f"{layout}.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightLoadError) as err:
        vision_ft.create_model("vit_tiny_patch16_224", pretrained=path, img_size=32)
    for fragment in expected:
        assert fragment in str(err.value)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_vit_in_chans_from_rgb_checkpoint(in_chans, tmp_path):
    name = "vit_tiny_patch16_224"
    ckpt = save_checkpoint(perturbed_timm_model(name, img_size=32), tmp_path)
    ref = timm.create_model(
        name, in_chans=in_chans, img_size=32, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt))
    ).eval()
    ours = vision_ft.create_model(name, pretrained=ckpt, in_chans=in_chans, img_size=32)
    errors = assert_models_match(ref, ours, img_size=32, label=f"in_chans={in_chans}")
    _report(f"{name} in_chans={in_chans}", errors)


def test_vit_new_classes_and_reset_classifier(tmp_path):
    name = "vit_tiny_patch16_224"
    ref = perturbed_timm_model(name, img_size=32)
    ckpt = save_checkpoint(ref, tmp_path)
    ours = vision_ft.create_model(name, pretrained=ckpt, num_classes=5, img_size=32)
    errors = assert_models_match(ref, ours, img_size=32, check_logits=False, label="num_classes=5")
    x = np.zeros((2, 32, 32, 3), np.float32)
    assert ours(x).shape == (2, 5) and ours.num_classes == 5
    ours.reset_classifier(0)
    assert ours.head is None and ours(x).shape == (2, 192)
    ours.reset_classifier(7)
    assert ours(x).shape == (2, 7)
    _report(f"{name} num_classes=5", errors)
    # DINOv2 is headless by default; a head can be added afterwards
    dino = vision_ft.create_model("vit_small_patch14_dinov2", img_size=28)
    dino.reset_classifier(3)
    assert dino(np.zeros((1, 28, 28, 3), np.float32)).shape == (1, 3)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_group_matcher_matches_timm(name):
    from timm.models._manipulate import group_parameters

    ref = timm.create_model(name, img_size=32 if "patch16" in name else 28, num_classes=10)
    ours = nnx.eval_shape(
        lambda: vision_ft.create_model(name, img_size=32 if "patch16" in name else 28, num_classes=10)
    )  # structure only
    timm_ids = {
        key.rpartition(".")[0] or key: gid
        for gid, keys in group_parameters(ref, ref.group_matcher()).items()
        for key in keys
    }
    our_ids = {
        path.rpartition(".")[0] if "." in path else path: i
        for path, i in layer_ids(param_paths(ours), ours.group_matcher()).items()
    }
    assert our_ids == timm_ids
    assert our_ids["cls_token"] == 0 and our_ids["norm"] == our_ids["blocks.11.norm1"]
    assert our_ids["head"] == our_ids["norm"] + 1


def test_drop_path_schedule_and_train_mode():
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.1)
    ours = vision_ft.create_model("vit_tiny_patch16_224", img_size=32, drop_path_rate=0.1)
    expected = [
        float(b.drop_path1.drop_prob) if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in ref.blocks
    ]
    assert [b.drop_path1.rate for b in ours.blocks] == pytest.approx(expected)
    assert [b.drop_path2.rate for b in ours.blocks] == pytest.approx(expected)
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    assert not np.allclose(np.asarray(ours(x, train=True)), np.asarray(ours(x)))
    with pytest.raises(ValueError, match="input size"):
        ours(np.zeros((1, 48, 48, 3), np.float32))


def test_meta_dinov2_layout_converted_like_timm():
    from timm.models.vision_transformer import checkpoint_filter_fn

    from vision_ft.models.vit import checkpoint_filter

    name = "vit_small_patch14_reg4_dinov2"
    ref = perturbed_timm_model(name, img_size=28)
    ours = nnx.eval_shape(lambda: vision_ft.create_model(name, img_size=28))
    meta = {k: v for k, v in ref.state_dict().items() if k != "reg_token"}
    meta["register_tokens"] = ref.reg_token.detach()
    meta["pos_embed"] = torch.cat([torch.randn(1, 1, 384), ref.pos_embed.detach()], dim=1)  # + class row
    meta["mask_token"] = torch.zeros(1, 384)
    expected = checkpoint_filter_fn(dict(meta), ref)
    got = checkpoint_filter({k: v.numpy() for k, v in meta.items()}, ours)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=0, atol=1e-7, err_msg=key)
