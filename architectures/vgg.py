"""The VGG19 feature network of SRGAN's content loss (Ledig et al. 2017, sec. 2.2.1, eq. 5): φ_i,j is "the
feature map obtained by the j-th convolution (after activation) before the i-th maxpooling layer" of the
ImageNet-trained VGG19 (Simonyan & Zisserman 2015). The network is torchvision's ``vgg19`` and its weights come
from a local file in torchvision's state dict format: nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# index in torchvision's vgg19().features just past the ReLU of conv i_j
LAYER_END = {"2_2": 9, "5_4": 36}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_SCALE = 12.75  # sec. 3.2: "VGG feature maps were also rescaled by a factor of 1/12.75"

HOW_TO_GET = (
    "It is torchvision's ImageNet VGG19 state dict (vgg19-dcbb9e9d.pth, 548 MB), which the config names in "
    'srgan.vgg_weights. On a machine with internet: python -c "import torchvision; '
    "torchvision.models.vgg19(weights='IMAGENET1K_V1')\", then copy ~/.cache/torch/hub/checkpoints/vgg19-dcbb9e9d.pth "
    "to that path. Without it, srgan.content: mse trains with the pixel-wise MSE content loss instead."
)


class VGGFeatures(nn.Module):
    """φ_i,j: images in [-1, 1] (1 or 3 channels) → ImageNet normalisation → VGG19 up to the ReLU of conv i_j.
    Frozen and in eval mode."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        return super().train(False)  # a fixed feature extractor: never in train mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.features(((x + 1) / 2 - self.mean) / self.std)


def _check_state_dict(sd: object, expected: dict[str, torch.Tensor], needed: int, path: Path) -> None:
    """A ValueError naming ``path`` and the first key that is unknown, missing or of the wrong shape."""
    if not isinstance(sd, dict):
        raise ValueError(f"{path} is not a VGG19 state dict (it holds a {type(sd).__name__}). {HOW_TO_GET}")
    for key, value in sd.items():
        if key not in expected:
            raise ValueError(f"{path} is not torchvision's VGG19 state dict: unexpected key {key!r}. {HOW_TO_GET}")
        if tuple(getattr(value, "shape", ())) != tuple(expected[key].shape):
            raise ValueError(
                f"{path} is not torchvision's VGG19 state dict: {key!r} has shape "
                f"{tuple(getattr(value, 'shape', ()))}, expected {tuple(expected[key].shape)}. {HOW_TO_GET}"
            )
    for key in expected:
        if key.startswith("features.") and int(key.split(".")[1]) < needed and key not in sd:
            raise ValueError(f"{path} is not torchvision's VGG19 state dict: missing key {key!r}. {HOW_TO_GET}")


def load_vgg19_features(path: str | Path, layer: str = "5_4") -> VGGFeatures:
    """φ_5,4 (the paper's VGG54, default) or φ_2,2 (VGG22) of torchvision's VGG19 with the weights in ``path``
    (torchvision's state dict, e.g. ``vgg19-dcbb9e9d.pth``; the classifier's keys may be absent). For a
    ``[N, C, H, W]`` input, φ_5,4 is ``[N, 512, H/16, W/16]`` and φ_2,2 ``[N, 128, H/2, W/2]``.

    Raises FileNotFoundError (saying what the file is and how to get it) when ``path`` does not exist and
    ValueError (naming the file and the first bad key) when it is not that state dict."""
    if layer not in LAYER_END:
        raise ValueError(f"unknown VGG19 layer {layer!r}; known: {', '.join(LAYER_END)}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weights for the SRGAN content loss not found at {path}. {HOW_TO_GET}")
    with torch.device("meta"):  # shapes only: the 120M-parameter classifier is never allocated
        vgg = torchvision.models.vgg19(weights=None)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that holds more than tensors
        raise ValueError(f"{path} is not a VGG19 state dict ({type(e).__name__}: {e}). {HOW_TO_GET}") from e
    end = LAYER_END[layer]
    _check_state_dict(sd, vgg.state_dict(), end, path)
    features = vgg.features[:end].to_empty(device="cpu")
    features.load_state_dict({k[len("features.") :]: v for k, v in sd.items() if _in_features(k, end)})
    return VGGFeatures(features)


def _in_features(key: str, end: int) -> bool:
    return key.startswith("features.") and int(key.split(".")[1]) < end


def vgg_content_loss(features: nn.Module, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The VGG content loss l_VGG/i.j of sec. 2.2.1, eq. 5: the mean squared distance between φ(fake) and
    φ(real). Sec. 3.2 rescales the feature maps "by a factor of 1/12.75" to bring the loss to the scale of the
    pixel MSE (≈ 0.006 = 1/12.75² times eq. 5), so this is ``mse(φ(fake) / 12.75, φ(real) / 12.75)``. The
    gradient flows to ``fake`` only."""
    with torch.no_grad():
        target = features(real) / FEATURE_SCALE
    return F.mse_loss(features(fake) / FEATURE_SCALE, target)
