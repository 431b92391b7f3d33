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

Image-to-image families (``Capabilities.conditioning == "image"``: pix2pix, cyclegan, srgan) instead have:

* ``G(x)`` maps input images ``[N, spec.input_channels, spec.input_resolution, spec.input_resolution]`` in
  ``[-1, 1]`` to images ``[N, spec.channels, spec.resolution, spec.resolution]``; no ``z_dim`` (or 0).
* ``D`` is the family's own (a PatchGAN returns a map of logits ``[N, 1, h, w]``); only its recipe calls it.
* With ``Capabilities.cycle`` (CycleGAN), G holds both generators: ``G.ab`` (A → B, what ``G(x)`` runs) and
  ``G.ba`` (B → A); ``G(a, b)`` runs the whole cycle in one call (see the family's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch.nn as nn

from core.config import StrictConfig
from core.spec import ImageSpec


class ArchConfig(StrictConfig):
    """Base of a family's network config; subclasses add ``arch: Literal["<name>"]``."""


@dataclass(frozen=True)
class Capabilities:
    """What a family's networks offer beyond ``G(z, c)`` and ``D(img, c)``, declared once so that the
    training loop and the tools never probe for attributes.

    * ``mapping``: G is ``G.mapping(z, c, truncation_psi=…)`` + ``G.synthesis(ws)`` with
      ``G.mapping_with_style_mixing`` (style mixing, path length regularization, ``--space w``);
      ``G(z, c, style_mixing_prob=p)`` trains with style mixing in one call.
    * ``growth``: G and D grow by levels of detail: ``net.set_lod(resolution, alpha)``, ``G.start_resolution``,
      ``net.current_resolution``.
    * ``ortho_parameters``: ``G.ortho_parameters()`` names the weights of orthogonal regularization.
    * ``class_logits``: a conditional D returns auxiliary class logits with ``D(img, c, return_class_logits=True)``
      (AC-GAN); such a D learns labels only through that term.
    * ``reduced_dtype``: G and D choose per-block precision through a ``reduced_dtype`` attribute instead of
      running under autocast.
    * ``noise_inputs``: G takes per-layer noise and ``G(z, c, noise_mode="const")`` makes it fixed.
    * ``truncation``: ``"psi"`` (``G(z, c, truncation_psi=ψ)``), ``"resample"`` (``G.truncated_latents(n, θ)``)
      or ``None``.
    * ``compiles``: the networks train correctly under ``torch.compile`` (``train.compile``).
    * ``d_blocks``: ``D.blocks`` lists D's blocks from the image side (Freeze-D freezes the first k).
    * ``conditioning``: ``"latent"`` (``G(z, c)``) or ``"image"`` (``G(x)``: image-to-image, see the module docstring).
    * ``cycle``: G holds two generators, ``G.ab`` and ``G.ba`` (CycleGAN).
    * ``features``: ``D(img, c, return_features=True)`` returns ``(logits, features)``, D's last hidden features
      (feature matching, Salimans et al. 2016).
    """

    mapping: bool = False
    growth: bool = False
    ortho_parameters: bool = False
    class_logits: bool = False
    reduced_dtype: bool = False
    noise_inputs: bool = False
    truncation: Literal["psi", "resample"] | None = None
    compiles: bool = True
    d_blocks: bool = False
    conditioning: Literal["latent", "image"] = "latent"
    cycle: bool = False
    features: bool = False


@dataclass(frozen=True)
class Architecture:
    """A GAN family: its config type, how to build G and D from a config and an image spec, what its networks
    can do, and optionally ``param_notes``, which ``ganforge info`` uses to say what the parameter counts include."""

    name: str
    config: type[ArchConfig]
    build_generator: Callable[[ArchConfig, ImageSpec], nn.Module]
    build_discriminator: Callable[[ArchConfig, ImageSpec], nn.Module]
    capabilities: Capabilities = Capabilities()
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
