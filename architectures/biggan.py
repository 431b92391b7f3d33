"""BigGAN (Brock, Donahue & Simonyan 2019, "Large Scale GAN Training for High Fidelity Natural Image
Synthesis"), following the authors' PyTorch code (ajbrock/BigGAN-PyTorch) where the paper is silent.

G (paper appendix B, figure 15 and table 4): a hierarchical latent (section 3, "Hierarchical latent
spaces"): z is split into one chunk per resolution; the first chunk goes through a linear layer to a
4×4 map, and every residual up-block receives its own chunk concatenated with a shared class
embedding. That vector is linearly projected to the gains and biases of the block's class-conditional
BatchNorms (section 3, "shared embedding"). A self-attention block (Zhang et al. 2019) follows the
block at the configured resolution(s); the output is BN → ReLU → 3×3 conv → tanh.

D: residual down-blocks (pre-activation except the first; the "D_wide" variant whose first conv
already has the output width), self-attention, ReLU, global sum pooling, a linear output and a
projection term (Miyato & Koyama 2018): logit = ψ(h) + ⟨embed(c), h⟩.

Every convolution, linear and embedding layer is spectrally normalised (section 2; Miyato et al.
2018) in G and D, except G's shared class embedding, which the authors leave plain ("applying SN to
G's embedding seems to randomly cripple G"). Weights start orthogonal (Saxe et al. 2014; the authors' ``--G_init/--D_init ortho``).

Training-recipe helpers: :meth:`BigGANGenerator.ortho_parameters` (what the orthogonal
regularisation of section 3.1 applies to), :func:`sample_truncated_z` (the truncation trick of
section 3.1) and :func:`convert_sync_batchnorm` (BatchNorm statistics across all devices, section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch.nn.utils.parametrizations import spectral_norm

from architectures.registry import ArchConfig, Architecture, Capabilities, register
from core.spec import ImageSpec


class BigGANConfig(ArchConfig):
    """BigGAN widths and numerics; the defaults are the authors' ImageNet 128×128 run
    (scripts/launch_BigGAN_bs256x8.sh)."""

    arch: Literal["biggan"] = "biggan"
    g_ch: int = Field(96, ge=1, description="G channel multiplier ('ch' of paper table 4)")
    d_ch: int = Field(96, ge=1, description="D channel multiplier")
    z_dim: int = Field(120, ge=1, description="latent size; `hier` rounds it down to whole chunks (see G.z_dim)")
    shared_dim: int = Field(128, ge=1, description="size of G's shared class embedding")
    hier: bool = Field(True, description="split z across the input layer and every G block (hierarchical latent)")
    attention: list[int] = Field([64], description="resolutions after whose blocks G and D apply self-attention")
    bn_eps: float = Field(1e-5, gt=0.0, description="BatchNorm epsilon in G")
    sn_eps: float = Field(1e-6, gt=0.0, description="epsilon of the spectral-norm power iteration")
    num_sv_itrs: int = Field(1, ge=1, le=100, description="power iterations per training forward pass")
    init: Literal["ortho", "N02", "xavier"] = Field("ortho", description="init of conv/linear/embedding weights")

    @field_validator("attention")
    @classmethod
    def _powers_of_two(cls, v: list[int]) -> list[int]:
        for r in v:
            if r < 4 or r & (r - 1):
                raise ValueError(f"attention resolution {r} is not a power of two >= 4")
        return v


# Channel multipliers per resolution (the authors' G_arch / D_arch).
# G: widths at 4×4, then after each up-block; block i maps mults[i] -> mults[i + 1].
G_MULTS: dict[int, list[int]] = {
    32: [4, 4, 4, 4],
    64: [16, 16, 8, 4, 2],
    128: [16, 16, 8, 4, 2, 1],
    256: [16, 16, 8, 8, 4, 2, 1],
    512: [16, 16, 8, 8, 4, 2, 1, 1],
}
# D: (output width of each down-block, whether it halves the resolution).
D_ARCH: dict[int, tuple[list[int], list[bool]]] = {
    32: ([4, 4, 4, 4], [True, True, False, False]),
    64: ([1, 2, 4, 8, 16], [True] * 4 + [False]),
    128: ([1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
    256: ([1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False]),
    512: ([1, 1, 2, 4, 8, 8, 16, 16], [True] * 7 + [False]),
}
BOTTOM_WIDTH = 4  # G starts from a 4×4 map


def _check_spec(cfg: BigGANConfig, spec: ImageSpec) -> None:
    if spec.resolution not in G_MULTS:
        raise ValueError(f"BigGAN supports resolutions {sorted(G_MULTS)}, not {spec.resolution}")
    g_res = {BOTTOM_WIDTH * 2 ** (i + 1) for i in range(len(G_MULTS[spec.resolution]) - 1)}
    d_res = set(_d_block_resolutions(spec.resolution))
    unused = set(cfg.attention) - g_res - d_res
    if unused:
        raise ValueError(
            f"attention at {sorted(unused)} px matches no G or D block at {spec.resolution} px; "
            f"G blocks output {sorted(g_res)}, D blocks {sorted(d_res)}"
        )


def _d_block_resolutions(resolution: int) -> list[int]:
    """Spatial size after each D block."""
    out, r = [], resolution
    for down in D_ARCH[resolution][1]:
        r = r // 2 if down else r
        out.append(r)
    return out


@dataclass(frozen=True)
class _SNLayers:
    """Makes initialised, spectrally normalised layers (torch's parametrization: the trainable
    weight is ``<layer>.parametrizations.weight.original``; ``u``/``v`` are buffers)."""

    eps: float
    itrs: int
    init: str

    def initialise(self, layer: nn.Module) -> nn.Module:
        w = layer.weight
        if self.init == "ortho":
            nn.init.orthogonal_(w)
        elif self.init == "N02":
            nn.init.normal_(w, 0.0, 0.02)
        else:
            nn.init.xavier_uniform_(w)
        return layer

    def sn(self, layer: nn.Module) -> nn.Module:
        # Initialise before wrapping: the parametrization seeds u, v from the current weight.
        return spectral_norm(self.initialise(layer), n_power_iterations=self.itrs, eps=self.eps)

    def conv(self, c_in: int, c_out: int, kernel: int = 3, bias: bool = True) -> nn.Module:
        return self.sn(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias))

    def linear(self, n_in: int, n_out: int, bias: bool = True) -> nn.Module:
        return self.sn(nn.Linear(n_in, n_out, bias=bias))

    def embedding(self, n: int, dim: int) -> nn.Module:
        return self.sn(nn.Embedding(n, dim))


class ConditionalBatchNorm2d(nn.Module):
    """BN(x) · (1 + W_γ y) + W_β y: a non-affine BatchNorm whose per-sample gain and bias are linear
    (spectrally normalised, bias-free) functions of the conditioning vector y = [shared(c), z_i]."""

    def __init__(self, num_features: int, cond_dim: int, eps: float, layers: _SNLayers):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gain = layers.linear(cond_dim, num_features, bias=False)
        self.bias = layers.linear(cond_dim, num_features, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(y)  # centred at 1 so that a zero projection is the identity
        bias = self.bias(y)
        return self.bn(x) * gain[:, :, None, None] + bias[:, :, None, None]


class SelfAttention(nn.Module):
    """SAGAN non-local block: x + γ · o(softmax(θ(x)ᵀ φ(x)) g(x)), with φ and g max-pooled 2×2 and
    γ starting at 0 (so the block starts as the identity)."""

    def __init__(self, ch: int, layers: _SNLayers):
        super().__init__()
        self.theta = layers.conv(ch, ch // 8, kernel=1, bias=False)
        self.phi = layers.conv(ch, ch // 8, kernel=1, bias=False)
        self.g = layers.conv(ch, ch // 2, kernel=1, bias=False)
        self.o = layers.conv(ch // 2, ch, kernel=1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))  # shape [1], not 0-dim: DeepSpeed cannot broadcast 0-dim parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, ch, h, w = x.shape
        theta = self.theta(x).flatten(2)  # [N, C/8, HW]
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # [N, C/8, HW/4]
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # [N, C/2, HW/4]
        beta = F.softmax(theta.transpose(1, 2) @ phi, -1)  # [N, HW, HW/4]: each position over pooled keys
        o = (g @ beta.transpose(1, 2)).view(n, ch // 2, h, w)
        return x + self.gamma * self.o(o)


class GBlock(nn.Module):
    """BN → ReLU → up ×2 → conv3 → BN → ReLU → conv3, plus (up ×2 → conv1) shortcut."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, eps: float, layers: _SNLayers):
        super().__init__()
        # With nothing to condition on (unconditional, no hierarchical z) this is an ordinary BN.
        if cond_dim:
            self.bn1 = ConditionalBatchNorm2d(c_in, cond_dim, eps, layers)
            self.bn2 = ConditionalBatchNorm2d(c_out, cond_dim, eps, layers)
        else:
            self.bn1 = nn.BatchNorm2d(c_in, eps=eps)
            self.bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.conv1 = layers.conv(c_in, c_out)
        self.conv2 = layers.conv(c_out, c_out)
        self.conv_sc = layers.conv(c_in, c_out, kernel=1)

    @staticmethod
    def _norm(bn: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return bn(x) if y is None else bn(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = F.relu(self._norm(self.bn1, x, y))
        h = F.interpolate(h, scale_factor=2)  # nearest neighbour
        h = self.conv1(h)
        h = self.conv2(F.relu(self._norm(self.bn2, h, y)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2))


class BigGANGenerator(nn.Module):
    """``G(z, c)``: z ``[N, G.z_dim]``, c ``[N]`` class indices (or None) → images in [-1, 1].

    ``G(z, class_embedding=e)`` uses a precomputed ``e = G.shared(c)`` instead of ``c`` (e.g. to
    interpolate between classes)."""

    def __init__(self, cfg: BigGANConfig, spec: ImageSpec):
        super().__init__()
        _check_spec(cfg, spec)
        layers = _SNLayers(cfg.sn_eps, cfg.num_sv_itrs, cfg.init)
        widths = [cfg.g_ch * m for m in G_MULTS[spec.resolution]]
        n_blocks = len(widths) - 1

        self.hier = cfg.hier
        if cfg.hier:  # one chunk for the input layer plus one per block
            self.z_chunk = cfg.z_dim // (n_blocks + 1)
            if self.z_chunk == 0:
                raise ValueError(f"z_dim {cfg.z_dim} is too small to split into {n_blocks + 1} chunks")
            self.z_dim = self.z_chunk * (n_blocks + 1)
        else:
            self.z_chunk = 0
            self.z_dim = cfg.z_dim

        # G's shared embedding is deliberately not spectrally normalised (see the module docstring).
        self.shared = layers.initialise(nn.Embedding(spec.num_classes, cfg.shared_dim)) if spec.num_classes else None
        cond_dim = (cfg.shared_dim if self.shared is not None else 0) + self.z_chunk

        self.linear = layers.linear(self.z_chunk if cfg.hier else self.z_dim, widths[0] * BOTTOM_WIDTH**2)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleList()
        for i in range(n_blocks):
            self.blocks.append(GBlock(widths[i], widths[i + 1], cond_dim, cfg.bn_eps, layers))
            out_res = BOTTOM_WIDTH * 2 ** (i + 1)
            use_attn = out_res in cfg.attention
            self.attn.append(SelfAttention(widths[i + 1], layers) if use_attn else nn.Identity())
        self.output = nn.Sequential(
            nn.BatchNorm2d(widths[-1], eps=cfg.bn_eps),
            nn.ReLU(),
            layers.conv(widths[-1], spec.channels),
        )

    def forward(
        self, z: torch.Tensor, c: torch.Tensor | None = None, class_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        if z.shape[1] != self.z_dim:
            raise ValueError(f"z has {z.shape[1]} dims, G.z_dim is {self.z_dim}")
        y = class_embedding
        if y is None and self.shared is not None:
            if c is None:
                raise ValueError("this BigGAN G is class-conditional: pass labels c")
            y = self.shared(c)

        if self.hier:
            z, *z_blocks = torch.split(z, self.z_chunk, dim=1)
        else:
            z_blocks = [None] * len(self.blocks)
        conds = [self._cond(y, z_i) for z_i in z_blocks]

        h = self.linear(z).view(z.shape[0], -1, BOTTOM_WIDTH, BOTTOM_WIDTH)
        for block, attn, cond in zip(self.blocks, self.attn, conds):
            h = attn(block(h, cond))
        return torch.tanh(self.output(h))

    @staticmethod
    def _cond(y: torch.Tensor | None, z_i: torch.Tensor | None) -> torch.Tensor | None:
        parts = [t for t in (y, z_i) if t is not None]
        return torch.cat(parts, dim=1) if parts else None

    def truncated_latents(self, n: int, threshold: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, G.z_dim]`` latents for sampling with BigGAN's truncation trick: entries with ``|z| > threshold``
        resampled (:func:`sample_truncated_z`). ``ganforge generate --truncation`` uses this for generators
        whose forward has no ``truncation_psi``."""
        return sample_truncated_z(n, self.z_dim, threshold, generator=generator)

    def ortho_parameters(self) -> list[nn.Parameter]:
        """Weights the orthogonal regularisation (paper eq. 3) applies to: every parameter with at
        least two axes (for SN layers, the raw weight ``parametrizations.weight.original``) except
        the shared class embedding, as in the authors' ``utils.ortho(G, ..., blacklist=G.shared)``."""
        shared = set() if self.shared is None else {id(p) for p in self.shared.parameters()}
        return [p for p in self.parameters() if p.ndim >= 2 and id(p) not in shared]


class DBlock(nn.Module):
    """[ReLU →] conv3 → ReLU → conv3 [→ avg-pool ×2], plus a conv1 (and pool) shortcut.
    The first block has no pre-activation (its input is the image) and pools before its shortcut
    conv; the others convolve first, as in the authors' code."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, preactivation: bool, layers: _SNLayers):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = layers.conv(c_in, c_out)  # "D_wide": the hidden width is the output width
        self.conv2 = layers.conv(c_out, c_out)
        self.conv_sc = layers.conv(c_in, c_out, kernel=1) if (c_in != c_out or downsample) else None

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_sc is None:
            return self._pool(x)
        return self._pool(self.conv_sc(x)) if self.preactivation else self.conv_sc(self._pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        return self._pool(h) + self._shortcut(x)


class BigGANDiscriminator(nn.Module):
    """``D(img, c)``: one logit per image, ``[N]``: ψ(h) + ⟨embed(c), h⟩ with h the ReLU'd,
    sum-pooled features (the projection term is absent when there are no classes)."""

    def __init__(self, cfg: BigGANConfig, spec: ImageSpec):
        super().__init__()
        _check_spec(cfg, spec)
        layers = _SNLayers(cfg.sn_eps, cfg.num_sv_itrs, cfg.init)
        mults, downs = D_ARCH[spec.resolution]
        widths = [spec.channels] + [cfg.d_ch * m for m in mults]
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleList()
        for i, (down, res) in enumerate(zip(downs, _d_block_resolutions(spec.resolution))):
            self.blocks.append(DBlock(widths[i], widths[i + 1], down, preactivation=i > 0, layers=layers))
            self.attn.append(SelfAttention(widths[i + 1], layers) if res in cfg.attention else nn.Identity())
        self.linear = layers.linear(widths[-1], 1)
        self.embed = layers.embedding(spec.num_classes, widths[-1]) if spec.num_classes else None

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """h: the last block's output after ReLU and global sum pooling, ``[N, C]``."""
        h = img
        for block, attn in zip(self.blocks, self.attn):
            h = attn(block(h))
        return F.relu(h).sum(dim=(2, 3))

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(img)
        logit = self.linear(h).squeeze(1)
        if self.embed is not None:
            if c is None:
                raise ValueError("this BigGAN D is class-conditional: pass labels c")
            logit = logit + (self.embed(c) * h).sum(dim=1)  # projection discriminator
        return logit


def sample_truncated_z(
    n: int,
    z_dim: int,
    threshold: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Truncation trick (paper section 3.1): z ~ N(0, I) with every entry whose magnitude exceeds
    ``threshold`` redrawn until it falls inside (resampled, not clipped)."""
    if threshold <= 0:
        raise ValueError(f"truncation threshold must be positive, got {threshold}")
    if device is None and generator is not None:
        device = generator.device
    z = torch.randn(n, z_dim, generator=generator, device=device)
    outside = z.abs() > threshold
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator, device=device)
        outside = z.abs() > threshold
    return z


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Cross-replica BatchNorm (section 3: G's BN statistics over all devices): swaps every
    BatchNorm2d, including the non-affine ones inside conditional BN, for ``torch.nn.SyncBatchNorm``
    (same statistics buffers). Call before wrapping in DistributedDataParallel; without an initialised process group
    SyncBatchNorm computes ordinary per-process statistics."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)


register(
    Architecture(
        "biggan",
        BigGANConfig,
        BigGANGenerator,
        BigGANDiscriminator,
        # compiled, D's backward finds a [1]-shaped tensor changed in place between the real and fake passes
        # ("modified by an inplace operation", torch 2.14); eager is correct
        Capabilities(ortho_parameters=True, truncation="resample", compiles=False, d_blocks=True),
    )
)
