"""State dicts of the authors' BigGAN-PyTorch (ajbrock/BigGAN-PyTorch: ``G.pth``, ``D.pth``, ``G_ema.pth``) →
a ganforge checkpoint.

The authors' networks have the layers of :mod:`architectures.biggan` in other containers: a block and its
attention share ``blocks.i`` (``blocks.i.0`` the block, ``blocks.i.1`` the attention) where ganforge has
``blocks.i`` and ``attn.i``; G's output is ``output_layer`` (BN gain/bias = ganforge's BN weight/bias). Their
BatchNorms keep ``stored_mean``/``stored_var`` (ganforge: ``running_mean``/``running_var``, plus a
``num_batches_tracked`` counter the authors do not keep, set to 0).

Spectral norm: the authors keep the raw weight as ``weight`` and the power-iteration vector ``u0`` (``[1, out]``)
with the last singular value estimate ``sv0``; ganforge uses torch's parametrization (raw weight
``parametrizations.weight.original``, vectors ``parametrizations.weight.0._u`` ``[out]`` and ``._v`` ``[in]``, and σ = uᵀWv in eval mode).
The authors' eval forward runs one power step from ``u0`` without storing it: v = normalize(u0 W),
u = normalize(W v), σ = uᵀWv. Those v and u become ``_v`` and ``_u``, so both compute the same σ;
``sv0`` (a training-time record of σ) is not needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from architectures.biggan import BOTTOM_WIDTH, D_ARCH, G_MULTS, BigGANConfig, BigGANDiscriminator, BigGANGenerator
from architectures.biggan import _d_block_resolutions as d_block_resolutions
from core.spec import ImageSpec
from orchestrator.data.write import sha256_file
from orchestrator.tools.imports.common import fit_state, write_checkpoint
from orchestrator.tools.imports.pickles import NetworkImportError

RESOLUTION_BY_G_BLOCKS = {len(m) - 1: r for r, m in G_MULTS.items()}
SN_V = ".v0"  # the name given here to the right singular vector computed from weight and u0


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict, read as data only (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise NetworkImportError(f"{path} does not exist or is not a file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported with its path
        raise NetworkImportError(f"cannot read {path} as a state dict (read as data only): {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise NetworkImportError(f"{path} is not a state dict (a mapping of names to tensors)")
    return dict(sd)


def spectral_vectors(sd: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """``sd`` with each SN layer's ``u0`` replaced by the u of the authors' eval power step, its v added under
    ``<layer>.v0``, and ``sv0`` dropped. A ``u0`` that does not fit its weight is left for the shape check."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".u0")]:
        layer = key[: -len(".u0")]
        weight = sd.get(layer + ".weight")
        if weight is None or sd[key].numel() != weight.shape[0]:
            continue
        w = weight.detach().float().reshape(weight.shape[0], -1)
        v = F.normalize(sd[key].float().reshape(1, -1) @ w, eps=eps)
        u = F.normalize(v @ w.t(), eps=eps)
        out[key], out[layer + SN_V] = u.flatten(), v.flatten()
        out.pop(layer + ".sv0", None)
    return out


def ganforge_name(name: str, sn_layers: set[str]) -> str:
    """Authors' tensor name → ganforge's (``blocks.3.1.theta.u0`` → ``attn.3.theta.parametrizations.weight.0._u``)."""
    layer, _, leaf = name.rpartition(".")
    if layer in sn_layers:
        leaf = {"weight": "parametrizations.weight.original", "u0": "parametrizations.weight.0._u"}.get(leaf, leaf)
        leaf = "parametrizations.weight.0._v" if leaf == SN_V[1:] else leaf
    name = f"{layer}.{leaf}" if layer else leaf
    name = re.sub(r"^blocks\.(\d+)\.0\.", r"blocks.\1.", name)
    name = re.sub(r"^blocks\.(\d+)\.1\.", r"attn.\1.", name)
    name = re.sub(r"^output_layer\.0\.gain$", "output.0.weight", name)
    name = re.sub(r"^output_layer\.", "output.", name)
    name = re.sub(r"\.(bn[12])\.stored_(mean|var)$", r".\1.bn.running_\2", name)
    return re.sub(r"^output\.0\.stored_(mean|var)$", r"output.0.running_\1", name)


def _block_indices(sd: dict[str, torch.Tensor], part: str) -> list[int]:
    return sorted({int(m[1]) for k in sd if (m := re.match(rf"blocks\.(\d+)\.{part}\.", k))})


def _shape(sd: dict[str, torch.Tensor], key: str, source: str) -> torch.Size:
    if key not in sd:
        raise NetworkImportError(f"{source} has no {key}: not a BigGAN-PyTorch state dict of a shared, D_wide model")
    return sd[key].shape


def infer_config(
    g: dict[str, torch.Tensor], d: dict[str, torch.Tensor], sources: tuple[str, str], bn_eps: float, sn_eps: float
) -> tuple[BigGANConfig, ImageSpec]:
    """Resolution, widths, classes, latent and attention from the tensor shapes of G and D."""
    gs, ds = sources
    n_blocks = len(_block_indices(g, "0"))
    if n_blocks not in RESOLUTION_BY_G_BLOCKS:
        raise NetworkImportError(f"{gs}: {n_blocks} G blocks match no BigGAN resolution ({sorted(G_MULTS)})")
    res = RESOLUTION_BY_G_BLOCKS[n_blocks]
    g_ch, rest = divmod(_shape(g, "blocks.0.0.conv1.weight", gs)[1], G_MULTS[res][0])
    d_out = _shape(d, "blocks.0.0.conv1.weight", ds)
    d_ch, d_rest = divmod(d_out[0], D_ARCH[res][0][0])
    if rest or d_rest or g_ch < 1 or d_ch < 1:
        raise NetworkImportError(f"{gs}, {ds}: the block widths are not a BigGAN {res} px channel multiplier's")
    classes = _shape(g, "shared.weight", gs)[0] if "shared.weight" in g else 0
    shared_dim = _shape(g, "shared.weight", gs)[1] if classes else 128
    z_in = _shape(g, "linear.weight", gs)[1]
    cond = _shape(g, "blocks.0.0.bn1.gain.weight", gs)[1] if "blocks.0.0.bn1.gain.weight" in g else 0
    hier = cond - (shared_dim if classes else 0) > 0
    g_attn = {BOTTOM_WIDTH * 2 ** (i + 1) for i in _block_indices(g, "1")}
    d_res = d_block_resolutions(res)
    d_attn = {d_res[i] for i in _block_indices(d, "1") if i < len(d_res)}
    if _attention_mismatch(g_attn, d_attn, res):
        raise NetworkImportError(
            f"{gs}: G has attention at {sorted(g_attn)} px, {ds}: D at {sorted(d_attn)} px; ganforge's BigGAN "
            f"applies one list to both networks"
        )
    spec = ImageSpec(res, _shape(g, "output_layer.2.weight", gs)[0], classes)
    cfg = BigGANConfig(
        g_ch=g_ch,
        d_ch=d_ch,
        z_dim=z_in * (n_blocks + 1) if hier else z_in,
        shared_dim=shared_dim,
        hier=hier,
        attention=sorted(g_attn | d_attn),
        bn_eps=bn_eps,
        sn_eps=sn_eps,
    )
    return cfg, spec


def _attention_mismatch(g_attn: set[int], d_attn: set[int], res: int) -> bool:
    """Whether one shared attention list cannot give both networks exactly the attention they have."""
    g_res = {BOTTOM_WIDTH * 2 ** (i + 1) for i in range(len(G_MULTS[res]) - 1)}
    d_res = set(d_block_resolutions(res))
    wanted = g_attn | d_attn
    return (wanted & g_res) != g_attn or (wanted & d_res) != d_attn


def convert(
    g_path: str | Path, d_path: str | Path, g_ema_path: str | Path, bn_eps: float = 1e-5, sn_eps: float = 1e-6
) -> tuple[BigGANConfig, ImageSpec, dict[str, dict[str, torch.Tensor]]]:
    """Config, image spec and ganforge state dicts (``G``, ``D``, ``G_ema``) of the authors' three files."""
    paths = {"G": Path(g_path), "D": Path(d_path), "G_ema": Path(g_ema_path)}
    raw = {key: load_state_dict(p) for key, p in paths.items()}
    cfg, spec = infer_config(raw["G_ema"], raw["D"], (str(paths["G_ema"]), str(paths["D"])), bn_eps, sn_eps)
    states = {}
    for key, sd in raw.items():
        module = BigGANDiscriminator(cfg, spec) if key == "D" else BigGANGenerator(cfg, spec)
        sn_layers = {k[: -len(".u0")] for k in sd if k.endswith(".u0")}
        tensors = spectral_vectors(sd, sn_eps)
        states[key] = fit_state(
            module,
            tensors,
            lambda n, sn=sn_layers: ganforge_name(n, sn),
            f"{paths[key]} ({key})",
            bookkeeping=lambda n: n.endswith("num_batches_tracked"),
        )
    return cfg, spec, states


def import_biggan_pytorch(
    g_path: str | Path,
    d_path: str | Path,
    g_ema_path: str | Path,
    out_dir: str | Path,
    shards: str | None = None,
    bn_eps: float = 1e-5,
    sn_eps: float = 1e-6,
) -> Path:
    """Import the authors' BigGAN-PyTorch ``G.pth``, ``D.pth``, ``G_ema.pth`` into a ganforge checkpoint under
    ``out_dir``; returns its path. ``bn_eps``/``sn_eps``: the run's ``--BN_eps``/``--SN_eps`` (the files do not
    record them; the defaults are the authors' ImageNet launch script's)."""
    cfg, spec, states = convert(g_path, d_path, g_ema_path, bn_eps, sn_eps)
    files = {
        key: {"name": Path(p).name, "sha256": sha256_file(Path(p))}
        for key, p in (("G", g_path), ("D", d_path), ("G_ema", g_ema_path))
    }
    info = {"format": "biggan-pytorch", "files": files}
    return write_checkpoint(out_dir, cfg, spec, states, info, shards)
