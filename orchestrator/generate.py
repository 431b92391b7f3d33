"""Images from a checkpoint's G_ema: one PNG per seed plus a grid."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

import architectures
from orchestrator.checkpoint import load_checkpoint, load_into
from orchestrator.config import ConfigError, config_from_yaml_text
from orchestrator.data import image_spec, load_manifest
from architectures.registry import ImageSpec


def load_generator(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """G_ema of a checkpoint, built from the config saved with it; returns ``(G_ema, config, spec)``."""
    state = load_checkpoint(checkpoint, map_location=device)
    cfg = config_from_yaml_text(state["config"], f"{checkpoint} (saved config)")
    try:
        spec = image_spec(cfg.data, load_manifest(cfg.data))
    except ValueError:  # shards moved away: the network's shape is in the saved weights' config
        d = cfg.data
        if d.resolution is None or d.channels is None:
            raise
        spec = ImageSpec(d.resolution, d.channels, d.num_classes or 0)
    G = architectures.get(cfg.model.arch).build_generator(cfg.model, spec).to(device)
    load_into(G, state["G_ema"], "G_ema")
    return G.eval().requires_grad_(False), cfg, spec


@torch.no_grad()
def generate(checkpoint: str | Path, out: str | Path, num: int, seed: int = 0, truncation: float | None = None,
             class_index: int | None = None, device: str = "cpu") -> list[Path]:
    """Write ``seed<S>.png`` for seeds ``seed … seed+num-1`` and ``grid.png`` to ``out``; return the paths."""
    import torchvision  # imported here: it costs ~1.5 s of start-up

    G, cfg, spec = load_generator(checkpoint, device)
    kwargs = {}
    if truncation is not None:
        if "truncation_psi" not in inspect.signature(G.forward).parameters:
            raise ConfigError(f"--truncation: the {cfg.model.arch} generator has no truncation trick; leave it out")
        kwargs["truncation_psi"] = truncation
    if class_index is not None and not 0 <= class_index < spec.num_classes:
        raise ConfigError(f"--class {class_index}: this model has {spec.num_classes} classes"
                          + (" (it is unconditional)" if not spec.num_classes else f"; use 0-{spec.num_classes - 1}"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for s in range(seed, seed + num):
        g = torch.Generator().manual_seed(s)
        z = torch.randn(1, G.z_dim, generator=g).to(device)
        c = None
        if spec.num_classes:
            c = torch.tensor([class_index if class_index is not None else int(torch.randint(spec.num_classes, (1,), generator=g))], device=device)
        img = G(z, c, **kwargs).float().clamp(-1, 1)
        images.append(img)
        paths.append(out / f"seed{s:04d}.png")
        torchvision.utils.save_image(img, paths[-1], normalize=True, value_range=(-1, 1))
    grid = out / "grid.png"
    torchvision.utils.save_image(torch.cat(images), grid, nrow=max(1, int(len(images) ** 0.5)), normalize=True,
                                 value_range=(-1, 1), padding=1)
    return paths + [grid]
