"""What the image → image recipes (Pix2Pix, CycleGAN, SRGAN) share: checks that the data and networks fit the
recipe, the linear learning-rate decay of the pix2pix/CycleGAN code, and CycleGAN's history of fakes.

Their real batches are ``{"input": x, "img": y}``: the input image G maps from and the image it should make (a
paired target, or for CycleGAN an independent image of domain B). None of them keeps an EMA copy: samples,
grids and evaluation use ``G`` itself, as the papers do.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from core.config import ConfigError
from orchestrator.recipes.recipe import RecipeSetup


def check_setup(setup: RecipeSetup, recipe: str, pairing: str, same_size: bool | None) -> None:
    """Config errors, raised before anything is built, when the data, the family or the noise → image options do
    not fit the ``recipe``: ``pairing`` of the data ("paired"/"unpaired"), ``same_size``: input and output of
    one size (True), the output larger (False, super-resolution) or either (None)."""
    spec, caps = setup.spec, setup.arch.capabilities
    if caps.conditioning != "image":
        raise ConfigError(
            f"train.recipe: {recipe} maps images to images, but model.arch {setup.arch.name} generates from noise; "
            f"use model.arch: {recipe}"
        )
    if not spec.translates or spec.pairing != pairing:
        how = {"paired": "ganforge data pairs A B OUT (or data superres)", "unpaired": "ganforge data unpaired A B OUT"}
        raise ConfigError(
            f"train.recipe: {recipe} needs {pairing} image → image shards, but data.shards holds "
            f"{spec.pairing if spec.translates else 'plain images'}; write them with `{how[pairing]}`"
        )
    if same_size is True and spec.input_resolution != spec.resolution:
        raise ConfigError(
            f"{recipe}: input images are {spec.input_resolution} px and targets {spec.resolution} px; "
            f"they must have one size (write the shards with one --resolution)"
        )
    if same_size is False and spec.input_resolution >= spec.resolution:
        raise ConfigError(f"{recipe}: input images ({spec.input_resolution} px) must be smaller than the targets")
    loss = setup.loss
    noise_only = ("r1_gamma", "gp_weight", "drift", "pl_weight", "style_mixing_prob", "ac_weight", "ortho_beta",
                  "clip", "label_smoothing")  # fmt: skip
    unused = [f"loss.{k}" for k in noise_only if getattr(loss, k)]
    unused += ["loss.unroll_steps"] if loss.unroll_steps else []
    unused += ["loss.d_steps"] if loss.d_steps != 1 else []
    unused += ["loss.pack"] if loss.pack != 1 else []
    unused += ["loss.feature_matching"] if loss.feature_matching != "off" else []
    unused += [f"augment.kind: {setup.augment.kind}"] if setup.augment.kind != "none" else []
    unused += ["finetune.freeze_d"] if setup.finetune.freeze_d else []
    if unused:
        raise ConfigError(f"{recipe} does not use {', '.join(unused)}: remove them from the config")


def linear_decay(total_kimg: float, start: float) -> Callable[[int], float] | None:
    """The learning-rate factor of the pix2pix/CycleGAN code: 1 until ``start`` × ``total_kimg``, then linearly
    down to 0 at the end (their ``lr_policy: linear``, continuous in images rather than per epoch). None when
    ``start`` is 1 (constant)."""
    if start >= 1:
        return None
    begin, end = start * total_kimg * 1000, total_kimg * 1000

    def factor(nimg: int) -> float:
        return 1.0 if nimg <= begin else max(0.0, (end - nimg) / (end - begin))

    return factor


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order (a collective call; ``x`` itself with one worker)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class ImagePool:
    """The history of generated images that CycleGAN's discriminators learn from (Shrivastava et al. 2017,
    section 2.3; Zhu et al. 2017, section 4): until ``size`` fakes are kept, each new fake is kept and used; then
    with probability ½ a new fake replaces a random kept one, which is used instead.

    One pool serves all workers: :meth:`query` takes the fakes of the *global* batch (every rank's, in rank order)
    and the recipe's seeded generator, which is the same on every rank, so every rank holds the same pool and the
    result does not depend on the worker count. Its images are checkpointed."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, fakes: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """The images D sees in place of ``fakes`` (detached), updating the pool."""
        fakes = fakes.detach()
        if self.size == 0:
            return fakes
        n = len(fakes)
        swap = torch.rand(n, generator=rng, device=rng.device) > 0.5
        slot = torch.randint(self.size, (n,), generator=rng, device=rng.device)
        out = []
        for i, img in enumerate(fakes):
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif swap[i]:
                j = int(slot[i])
                out.append(self.images[j])
                self.images[j] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"size": self.size, "images": torch.stack(self.images) if self.images else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.images = list(state["images"].unbind(0)) if len(state["images"]) else []


def as_shown(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images ``N×C×h×w`` in [-1, 1] as RGB at ``resolution`` px (grey repeated; smaller inputs enlarged by pixel
    repetition, so that a low-resolution input looks as coarse as it is)."""
    img = img.float()
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    if img.shape[-1] != resolution:
        img = torch.nn.functional.interpolate(img, size=(resolution, resolution), mode="nearest")
    return img


@torch.no_grad()
def panels(G: torch.nn.Module, a: torch.Tensor, b: torch.Tensor | None, cycle: bool) -> list[torch.Tensor]:
    """Rows of three RGB images in [-1, 1] per example: input | output | target for paired data (``a`` inputs,
    ``b`` their targets), and A | A → B | A → B → A then B | B → A | B → A → B for CycleGAN (``G.ab``, ``G.ba``)."""
    was_training = G.training
    G.eval()
    try:
        if cycle:
            ab = G.ab(a)
            rows = list(zip(a, ab, G.ba(ab)))
            if b is not None:
                ba = G.ba(b)
                rows += list(zip(b, ba, G.ab(ba)))
        else:
            out = G(a)
            rows = list(zip(a, out, b if b is not None else out))
    finally:
        G.train(was_training)
    size = max(x.shape[-1] for row in rows for x in row)
    return [as_shown(x[None], size)[0] for row in rows for x in row]
