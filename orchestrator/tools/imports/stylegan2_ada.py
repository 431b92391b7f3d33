"""StyleGAN2 network pickles of NVlabs' ``stylegan2-ada-pytorch`` and ``stylegan3`` → a ganforge checkpoint.

The pickle is a dict with ``G``, ``D`` and ``G_ema`` (plus training leftovers, ignored), each a
``torch_utils.persistence`` record read as data by :mod:`~orchestrator.tools.imports.pickles`. A record's
state is the module's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules`` (nested records) and
``_init_kwargs``; its other attributes (``conv_clamp``, ``use_fp16``, ``w_avg_beta``, …) say what a keyword
left to the class default meant, since the two repositories' defaults differ.

Names: the official networks and ganforge's have the same layers and parameters; only the containers are
named differently (``mapping.fcK`` → ``mapping.layers.K``; ``synthesis.bR`` → ``synthesis.blocks.i`` from
4×4 up; D ``bR`` → ``blocks.i`` from the top resolution down, the 4×4 epilogue staying ``b4``), and the
0-dim ``noise_strength`` becomes shape ``[1]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from architectures.stylegan2 import StyleGAN2Config, build_discriminator, build_generator
from core.spec import ImageSpec
from orchestrator.data.write import sha256_file
from orchestrator.tools.imports.common import fit_state, write_checkpoint
from orchestrator.tools.imports.pickles import NetworkImportError, Record, load_network_pickle

NETWORKS = {"G": "Generator", "D": "Discriminator", "G_ema": "Generator"}
FIR = [1, 3, 3, 1]
#: Keywords that change only speed, memory layout or which layers train: they leave the function as it is.
NO_EFFECT = {"fp16_channels_last", "channels_last", "fused_modconv_default", "freeze_layers"}


@dataclass
class OfficialNetwork:
    """One network of the pickle: its class, its init keywords and its tensors under the official names."""

    class_name: str
    init_kwargs: dict
    tensors: dict[str, torch.Tensor]
    record: Record

    def find(self, path: str) -> Record | None:
        """The nested record at a dotted module path (``synthesis.b4.conv1``), or None."""
        rec: Any = self.record
        for part in path.split("."):
            rec = (rec.get("_modules") or {}).get(part) if isinstance(rec, Record) else None
        return rec if isinstance(rec, Record) else None


def collect_tensors(rec: Record, prefix: str, out: dict[str, torch.Tensor], source: str) -> None:
    """Parameters and buffers of a record and its nested module records, under their dotted names."""
    for group in ("_parameters", "_buffers"):
        for name, t in (rec.get(group) or {}).items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise NetworkImportError(f"{source}: {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t
    for name, sub in (rec.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, Record):
            raise NetworkImportError(f"{source}: module {prefix}{name} is a {type(sub).__name__}, not a network record")
        collect_tensors(sub, f"{prefix}{name}.", out, source)


def read_networks(path: str | Path) -> dict[str, OfficialNetwork]:
    """``G``, ``D`` and ``G_ema`` of an official network pickle, as data (no code from the file runs)."""
    data = load_network_pickle(path)
    if not isinstance(data, dict):
        raise NetworkImportError(
            f"{path} holds a {type(data).__name__}, not the dict of networks an official pickle has"
        )
    nets = {}
    for key, cls in NETWORKS.items():
        rec = data.get(key)
        if not isinstance(rec, Record):
            raise NetworkImportError(f"{path} has no network {key!r} (found {sorted(map(str, data))})")
        if rec.class_name != cls:
            raise NetworkImportError(f"{path}: {key} is a {rec.class_name}, expected StyleGAN2's {cls}")
        if rec.get("_init_args"):
            raise NetworkImportError(f"{path}: {key} was built with positional arguments, which ganforge cannot read")
        tensors: dict[str, torch.Tensor] = {}
        collect_tensors(rec, "", tensors, f"{path} {key}")
        nets[key] = OfficialNetwork(cls, dict(rec.get("_init_kwargs") or {}), tensors, rec)
    return nets


# ---------------------------------------------------------------------------------------------------
# Names.


def generator_name(name: str) -> str:
    """Official G tensor name → ganforge's (``synthesis.b8.conv0.weight`` → ``synthesis.blocks.1.conv0.weight``)."""
    name = re.sub(r"^mapping\.fc(\d+)\.", r"mapping.layers.\1.", name)
    return re.sub(r"^synthesis\.b(\d+)\.", lambda m: f"synthesis.blocks.{int(math.log2(int(m[1]))) - 2}.", name)


def discriminator_name(name: str, resolution: int) -> str:
    """Official D tensor name → ganforge's (at 32 px: ``b32.conv0.weight`` → ``blocks.0.conv0.weight``)."""
    name = re.sub(r"^mapping\.fc(\d+)\.", r"mapping.layers.\1.", name)
    top = int(math.log2(resolution))

    def block(m: re.Match) -> str:
        res = int(m[1])
        return m[0] if res == 4 else f"blocks.{top - int(math.log2(res))}."

    return re.sub(r"^b(\d+)\.", block, name)


# ---------------------------------------------------------------------------------------------------
# Keywords → StyleGAN2Config.


def _take(kwargs: dict, key: str, fallback: Any) -> Any:
    return kwargs.pop(key) if key in kwargs else fallback


def _require(where: str, key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise NetworkImportError(
            f"{where}: {key}={value!r} has no ganforge equivalent (ganforge builds {allowed[0]!r}); not imported"
        )


def _refuse_rest(where: str, kwargs: dict) -> None:
    rest = {k: v for k, v in kwargs.items() if k not in NO_EFFECT}
    if rest:
        raise NetworkImportError(f"{where}: init keywords with no ganforge equivalent: {rest}; not imported")


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _mbstd_channels(net: OfficialNetwork) -> int:
    """The epilogue's minibatch-stddev channels: its layer's own count, 0 where the layer is None."""
    b4 = net.find("b4") or Record("", {})
    modules = b4.get("_modules") or {}
    if "mbstd" in modules and modules["mbstd"] is None:
        return 0
    return int((net.find("b4.mbstd") or Record("", {})).get("num_channels", 1))


def _fp16_count(net: OfficialNetwork, prefix: str, resolutions: list[int]) -> int:
    return sum(bool((net.find(f"{prefix}b{r}") or Record("", {})).get("use_fp16")) for r in resolutions)


def generator_settings(net: OfficialNetwork, where: str) -> dict:
    """G's init keywords as ganforge settings (``StyleGAN2Config`` fields and the image spec's)."""
    kw = dict(net.init_kwargs)
    mapping = dict(_take(kw, "mapping_kwargs", {}) or {})
    synthesis = {**dict(_take(kw, "synthesis_kwargs", {}) or {})}
    top = {k: kw.pop(k) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels") if k in kw}
    synthesis.update(kw)  # stylegan3's networks_stylegan2 takes the synthesis keywords flat
    missing = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"} - set(top)
    if missing:
        raise NetworkImportError(f"{where}: init keywords {sorted(missing)} are missing")
    res = int(top["img_resolution"])
    rec_map = net.find("mapping") or Record("", {})
    fc0 = net.find("mapping.fc0") or Record("", {})
    w_dim = int(top["w_dim"])
    s = dict(
        z_dim=int(top["z_dim"]),
        w_dim=w_dim,
        num_classes=int(top["c_dim"]),
        resolution=res,
        channels=int(top["img_channels"]),
        mapping_layers=int(_take(mapping, "num_layers", rec_map.get("num_layers", 8))),
        mapping_lr_multiplier=float(_take(mapping, "lr_multiplier", fc0.get("bias_gain", 0.01))),
        w_avg_beta=_take(mapping, "w_avg_beta", rec_map.get("w_avg_beta", 0.995)),
    )
    if s["w_avg_beta"] is None:
        raise NetworkImportError(f"{where}: mapping_kwargs.w_avg_beta=None (no w_avg) has no ganforge equivalent")
    s["w_avg_beta"] = float(s["w_avg_beta"])
    for key in ("embed_features", "layer_features"):
        _require(f"{where} mapping_kwargs", key, _take(mapping, key, None), (None, w_dim))
    _require(f"{where} mapping_kwargs", "activation", _take(mapping, "activation", "lrelu"), ("lrelu",))
    _refuse_rest(f"{where} mapping_kwargs", mapping)

    block_res = [2**i for i in range(2, int(math.log2(res)) + 1)]
    layer = net.find("synthesis.b4.conv1") or Record("", {})
    block = net.find(f"synthesis.b{res}") or Record("", {})
    s.update(
        channel_base=int(_take(synthesis, "channel_base", 32768)),
        channel_max=int(_take(synthesis, "channel_max", 512)),
        num_fp16_res=int(_take(synthesis, "num_fp16_res", _fp16_count(net, "synthesis.", block_res))),
        conv_clamp=_float_or_none(_take(synthesis, "conv_clamp", layer.get("conv_clamp"))),
        g_architecture=_take(synthesis, "architecture", block.get("architecture", "skip")),
    )
    _require(f"{where} synthesis", "resample_filter", list(_take(synthesis, "resample_filter", FIR)), (FIR,))
    _require(f"{where} synthesis", "use_noise", _take(synthesis, "use_noise", True), (True,))
    _require(f"{where} synthesis", "activation", _take(synthesis, "activation", "lrelu"), ("lrelu",))
    _require(f"{where} synthesis", "kernel_size", _take(synthesis, "kernel_size", 3), (3,))
    _refuse_rest(f"{where} synthesis keywords", synthesis)
    return s


def discriminator_settings(net: OfficialNetwork, where: str) -> dict:
    """D's init keywords as ganforge settings."""
    kw = dict(net.init_kwargs)
    block_kw = dict(_take(kw, "block_kwargs", {}) or {})
    mapping = dict(_take(kw, "mapping_kwargs", {}) or {})
    epilogue = dict(_take(kw, "epilogue_kwargs", {}) or {})
    res = int(_take(kw, "img_resolution", 0))
    if res < 4:
        raise NetworkImportError(f"{where}: init keyword img_resolution is missing")
    b4conv = net.find("b4.conv") or Record("", {})
    mbstd = net.find("b4.mbstd")
    s = dict(
        num_classes=int(_take(kw, "c_dim", 0)),
        resolution=res,
        channels=int(_take(kw, "img_channels", 3)),
        d_architecture=_take(kw, "architecture", (net.find("b4") or Record("", {})).get("architecture", "resnet")),
        channel_base=int(_take(kw, "channel_base", 32768)),
        channel_max=int(_take(kw, "channel_max", 512)),
        num_fp16_res=int(
            _take(kw, "num_fp16_res", _fp16_count(net, "", [2**i for i in range(3, int(math.log2(res)) + 1)]))
        ),
        conv_clamp=_float_or_none(_take(kw, "conv_clamp", b4conv.get("conv_clamp"))),
        cmap_dim=_take(kw, "cmap_dim", None),
        mbstd_group_size=_int_or_none(_take(epilogue, "mbstd_group_size", mbstd.get("group_size", 4) if mbstd else 4)),
        mbstd_num_channels=int(_take(epilogue, "mbstd_num_channels", _mbstd_channels(net))),
    )
    if s["mbstd_group_size"] is None:
        raise NetworkImportError(f"{where}: mbstd_group_size=None (the whole batch) has no ganforge equivalent")
    for part, d in (("block_kwargs", block_kw), ("epilogue_kwargs", epilogue), ("mapping_kwargs", mapping)):
        _require(f"{where} {part}", "activation", _take(d, "activation", "lrelu"), ("lrelu",))
    _require(f"{where} block_kwargs", "resample_filter", list(_take(block_kw, "resample_filter", FIR)), (FIR,))
    _require(f"{where} mapping_kwargs", "num_layers", _take(mapping, "num_layers", 8), (8,))
    _require(f"{where} mapping_kwargs", "lr_multiplier", _take(mapping, "lr_multiplier", 0.01), (0.01,))
    for key in ("embed_features", "layer_features"):
        _require(f"{where} mapping_kwargs", key, _take(mapping, key, None), (None,))
    for part, d in (
        ("", kw),
        (" block_kwargs", block_kw),
        (" epilogue_kwargs", epilogue),
        (" mapping_kwargs", mapping),
    ):
        _refuse_rest(where + part, d)
    return s


def model_config(nets: dict[str, OfficialNetwork], source: str) -> tuple[StyleGAN2Config, ImageSpec]:
    """The ganforge config and image spec of the pickle's networks; G, G_ema and D must agree."""
    g = generator_settings(nets["G_ema"], f"{source} G_ema")
    if generator_settings(nets["G"], f"{source} G") != g:
        raise NetworkImportError(f"{source}: G and G_ema were built with different init keywords")
    d = discriminator_settings(nets["D"], f"{source} D")
    for key in sorted(set(g) & set(d)):
        if g[key] != d[key]:
            raise NetworkImportError(
                f"{source}: G has {key}={g[key]!r} but D has {d[key]!r}; ganforge's StyleGAN2 config shares it"
            )
    spec = ImageSpec(g.pop("resolution"), g.pop("channels"), g.pop("num_classes"))
    for key in ("resolution", "channels", "num_classes"):
        d.pop(key)
    try:
        return StyleGAN2Config(**{**g, **d}), spec
    except ValueError as e:
        raise NetworkImportError(f"{source}: the networks' settings are not a valid ganforge config: {e}") from None


# ---------------------------------------------------------------------------------------------------
# The import.


def convert(path: str | Path) -> tuple[StyleGAN2Config, ImageSpec, dict[str, dict[str, torch.Tensor]]]:
    """Config, image spec and ganforge state dicts (``G``, ``D``, ``G_ema``) of an official pickle."""
    source = str(path)
    nets = read_networks(path)
    cfg, spec = model_config(nets, source)
    states = {}
    for key, net in nets.items():
        if net.class_name == "Generator":
            module, rename = build_generator(cfg, spec), generator_name
        else:
            module, rename = build_discriminator(cfg, spec), lambda n: discriminator_name(n, spec.resolution)
        states[key] = fit_state(module, net.tensors, rename, f"{source} {key}")
    return cfg, spec, states


def import_stylegan2_ada(path: str | Path, out_dir: str | Path, shards: str | None = None) -> Path:
    """Import an official StyleGAN2 network pickle (``stylegan2-ada-pytorch`` or ``stylegan3``) into a ganforge
    checkpoint under ``out_dir``; returns the checkpoint's path. ``shards``: ``data.shards`` of its config
    (default: a placeholder to replace before training)."""
    path = Path(path)
    cfg, spec, states = convert(path)
    info = {"format": "stylegan2-ada", "files": {"pickle": {"name": path.name, "sha256": sha256_file(path)}}}
    return write_checkpoint(out_dir, cfg, spec, states, info, shards)
