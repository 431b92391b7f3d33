"""GAN networks as plain ``nn.Module``s, one file per family, looked up through :mod:`.registry`."""
from architectures import dcgan, mlp  # noqa: F401  (each module registers its family)
from architectures import biggan  # noqa: F401
from architectures import stylegan2  # noqa: F401
from architectures import progan  # noqa: F401
from architectures.registry import REGISTRY, Architecture, ArchConfig, Capabilities, count_params, get
from core.spec import ImageSpec

__all__ = ["REGISTRY", "Architecture", "ArchConfig", "Capabilities", "ImageSpec", "count_params", "get"]
