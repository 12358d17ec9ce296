"""forward_intermediates (behind `embed --layer`) against timm's forward_intermediates."""

import numpy as np
import pytest
import torch

import vision_ft
from tests.parity import TOLERANCE, perturbed_timm_model, relative_error, save_checkpoint

# timm counts ResNet's stem as stage 0 (ours are the stages after it) and returns EfficientNet's
# block stages only where the resolution drops (its stage_ends); ours are every block stage
CASES = [("resnet18", 1, {}), ("tf_efficientnet_lite0", 0, {}), ("convnext_atto", 0, {}),
         ("vit_tiny_patch16_224", 0, {"img_size": 32})]  # fmt: skip


@pytest.mark.parametrize("name, skip, kwargs", CASES)
def test_intermediates_match_timm(name, skip, kwargs, tmp_path):
    ref = perturbed_timm_model(name, **kwargs)
    ours = vision_ft.create_model(name, pretrained=str(save_checkpoint(ref, tmp_path)), **kwargs)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        theirs = ref.forward_intermediates(torch.from_numpy(x), intermediates_only=True)[skip:]
    mine = ours.forward_intermediates(np.transpose(x, (0, 2, 3, 1)))
    if name.startswith("tf_efficientnet"):
        mine = [mine[end - 1] for end in ref.stage_ends]
    assert len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if name.startswith("vit"):  # timm drops the prefix tokens and lays patches out as NCHW
            b = b.flatten(2).transpose(1, 2)
            a = np.asarray(a)[:, ours.num_prefix_tokens :]
        else:
            b = b.permute(0, 2, 3, 1)
        assert relative_error(np.asarray(a), b.numpy()) <= TOLERANCE, (name, i)
        pooled = np.asarray(ours.pool_intermediate(np.asarray(mine[i])))
        assert pooled.shape == (2, b.shape[-1])
