"""The architecture registry: a plain mapping from a name to its config and network builders.

Each family module (``mlp``, ``dcgan``, ``stylegan2``, ...) defines a small pydantic config whose
``arch`` field is a ``Literal`` of its name, plus two builders, and registers them here with
:func:`register`. The orchestrator never refers to a network by a class-name string: it looks the
family up in :data:`REGISTRY` by the ``model.arch`` value of a validated config.

Network contract (what the training loop relies on):

* ``G(z, c)`` maps latents ``z`` of shape ``[N, G.z_dim]`` and integer class labels ``c`` of shape
  ``[N]`` (``None`` for unconditional models) to images ``[N, channels, resolution, resolution]``
  roughly in ``[-1, 1]``. ``G.z_dim`` is an ``int`` attribute.
* ``D(img, c)`` maps images and labels to one real/fake logit per image, shape ``[N]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from core.config import StrictConfig
from core.spec import ImageSpec


class ArchConfig(StrictConfig):
    """Base of a family's network config; subclasses add ``arch: Literal["<name>"]``."""


@dataclass(frozen=True)
class Architecture:
    """A GAN family: its config type, how to build G and D from a config and an image spec, and optionally
    ``param_notes``, which ``ganforge info`` uses to say what the parameter counts include."""

    name: str
    config: type[ArchConfig]
    build_generator: Callable[[ArchConfig, ImageSpec], nn.Module]
    build_discriminator: Callable[[ArchConfig, ImageSpec], nn.Module]
    # optional, for `ganforge info`: (G, D) -> (extra JSON keys, a sentence on what the counts include)
    param_notes: Callable[[nn.Module, nn.Module], tuple[dict[str, int], str]] | None = None


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add a family to :data:`REGISTRY` (its name must be new)."""
    if arch.name in REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is registered twice")
    REGISTRY[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    """The family called ``name``; the error lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters (what papers and official code report)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
