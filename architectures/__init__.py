"""GAN networks as plain ``nn.Module``s, one file per family, looked up through :mod:`.registry`."""

from architectures import (  # noqa: F401  (each module registers its family)
    biggan,  # noqa: F401
    cyclegan,  # noqa: F401
    dcgan,
    mlp,
    pix2pix,  # noqa: F401
    progan,  # noqa: F401
    srgan,  # noqa: F401
    stylegan,  # noqa: F401
    stylegan2,  # noqa: F401
)
from architectures.registry import REGISTRY, ArchConfig, Architecture, Capabilities, count_params, get
from core.spec import ImageSpec

__all__ = ["REGISTRY", "Architecture", "ArchConfig", "Capabilities", "ImageSpec", "count_params", "get"]
