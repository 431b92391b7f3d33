"""Images from a checkpoint's G_ema: one PNG per seed plus a grid, or a latent interpolation (PNGs and a GIF).

Every file written is labelled as synthetic in its metadata: PNG text chunks (``Description``, ``Comment``,
``ganforge:synthetic`` = ``true`` and the generation parameters) plus an XMP packet with the IPTC digital source
type for AI-generated media, and a GIF comment. Read them back with ``PIL.Image.open(path).text``.

A seed fixes everything about one image: its latent ``z`` and, for a conditional model sampled without
``--class``, its class. Images are generated one at a time, so an image does not depend on what else was
generated with it, and StyleGAN2's per-layer noise is the generator's fixed buffer (``noise_mode="const"``).

Generators with a mapping network (StyleGAN2) draw seeds as NVlabs' ``generate.py`` does, so a seed of an
imported official network (``ganforge import``) is the official tool's image, pixel for pixel:
``z = np.random.RandomState(seed).randn(1, z_dim)``, and a class not given with ``--class`` is
``RandomState(seed).randint(num_classes)`` drawn right after z (the official tool requires ``--class``).
Other families draw z (then the class) from ``torch.Generator().manual_seed(seed)``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.config import ConfigError
from orchestrator.checkpoint import load_generator

SYNTHETIC_KEY = "ganforge:synthetic"
# IPTC NewsCodes "digital source type" for media created by a trained generative model: the standard,
# machine-readable label that C2PA/IPTC-aware tools look for.
IPTC_TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MAX_SEED = 2**32 - 1

Space = Literal["auto", "z", "w"]


# ---------------------------------------------------------------------------------------------------
# Seeds: "0-63", "0-3,7,10-12".


def parse_seeds(text: str) -> list[int]:
    """Seeds from a comma-separated list of numbers and inclusive ranges (``"0-3,7,10-12"``), in order,
    duplicates dropped. Raises ``ValueError`` with the offending part."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a seed or a range like 0-63 (seeds are whole numbers ≥ 0)") from None
        if a > b:
            raise ValueError(f"{part!r}: a range goes from low to high, e.g. {b}-{a}")
        if b > MAX_SEED:
            raise ValueError(f"{part!r}: seeds go up to {MAX_SEED}")
        seeds.extend(range(a, b + 1))
    return list(dict.fromkeys(seeds))


def format_seeds(seeds: list[int]) -> str:
    """The inverse of :func:`parse_seeds`: ``[0, 1, 2, 3, 7]`` → ``"0-3,7"``."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def seeds_arg(text: str) -> list[int]:
    """``argparse`` type for ``--seeds``."""
    try:
        return parse_seeds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seed_pair_arg(text: str) -> tuple[int, int]:
    """``argparse`` type for ``--interpolate SEED_A,SEED_B``."""
    parts = text.split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two seeds, e.g. 3,7") from None
    if not (0 <= a <= MAX_SEED and 0 <= b <= MAX_SEED):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are whole numbers from 0 to {MAX_SEED}")
    return a, b


# ---------------------------------------------------------------------------------------------------
# Latents and images.


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between latents ``a`` and ``b`` (rows), exact at ``t`` = 0 and 1.

    Gaussian latents concentrate near a sphere; a straight line between two of them passes through
    atypically short vectors, the arc does not (White, "Sampling Generative Networks", 2016)."""
    if t <= 0:
        return a.clone()
    if t >= 1:
        return b.clone()
    cos = ((a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))).clamp(-1, 1)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    if float(so.abs().min()) < 1e-6:  # (anti)parallel: the arc is undefined, the line is as good
        return torch.lerp(a, b, t)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [-1, 1] → ``[H, W, C]`` uint8, rounded: ``x * 127.5 + 128`` truncated, the official
    StyleGAN tools' expression (it equals ``(x + 1) * 127.5 + 0.5``, torchvision's rounding, but only this
    form gives the official tools' float32 values bit for bit)."""
    x = (img.detach().float().clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def to_pil(img: torch.Tensor) -> Image.Image:
    """One image ``[C, H, W]`` in [-1, 1] as a PIL image (``L`` for one channel, ``RGB`` for three)."""
    a = to_uint8(img)
    return Image.fromarray(a[:, :, 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")


def make_grid(images: list[torch.Tensor], ncol: int, padding: int = 1) -> torch.Tensor:
    """Images ``[C, H, W]`` in rows of ``ncol`` with ``padding`` black pixels between them (as
    ``torchvision.utils.make_grid``, without its import cost)."""
    c, h, w = images[0].shape
    ncol = max(1, min(ncol, len(images)))
    nrow = math.ceil(len(images) / ncol)
    grid = torch.full((c, nrow * (h + padding) + padding, ncol * (w + padding) + padding), -1.0)
    for i, img in enumerate(images):
        y, x = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, y : y + h, x : x + w] = img.float().cpu()
    return grid


@dataclass
class Provenance:
    """What produced an image: written into its metadata."""

    arch: str
    checkpoint: str
    step: int | None
    kimg: float | None

    @classmethod
    def of(cls, checkpoint: str | Path, arch: str, progress: dict) -> Provenance:
        """The provenance of images from ``checkpoint`` (its family and its ``progress`` state)."""
        nimg = progress.get("nimg")
        return cls(
            arch, str(Path(checkpoint).resolve()), progress.get("step"), nimg / 1000 if nimg is not None else None
        )

    def pnginfo(self, what: str, **params: object) -> PngInfo:
        """PNG text chunks labelling the image as synthetic, with ``params`` (seed, ψ, class, …)."""
        described = (
            f"Synthetic image generated by a GAN ({self.arch} generator, ganforge) from checkpoint "
            f"{self.checkpoint}"
            + (f" at step {self.step}" if self.step is not None else "")
            + f": {what}. Not a photograph."
        )
        info = PngInfo()
        text = {
            "Title": f"ganforge synthetic image: {what}",
            "Description": described,
            "Comment": "synthetic (AI-generated) image",
            "Software": "ganforge",
            "Source": f"ganforge {self.arch} generator",
            SYNTHETIC_KEY: "true",
            "ganforge:arch": self.arch,
            "ganforge:checkpoint": self.checkpoint,
            **({"ganforge:step": str(self.step)} if self.step is not None else {}),
            **({"ganforge:kimg": f"{self.kimg:g}"} if self.kimg is not None else {}),
            **{f"ganforge:{k}": str(v) for k, v in params.items()},
        }
        for key, value in text.items():
            if value.isascii():
                info.add_text(key, value)
            else:  # tEXt is Latin-1 only; iTXt carries UTF-8 (a ψ or a non-ASCII path)
                info.add_itxt(key, value)
        info.add_itxt("XML:com.adobe.xmp", _xmp(described))
        return info

    def gif_comment(self, what: str) -> bytes:
        return (
            f"Synthetic image generated by a GAN ({self.arch} generator, ganforge) from {self.checkpoint}: "
            f"{what}. {SYNTHETIC_KEY}=true"
        ).encode()


def _xmp(description: str) -> str:
    from xml.sax.saxutils import escape

    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f"<Iptc4xmpExt:DigitalSourceType>{IPTC_TRAINED_ALGORITHMIC_MEDIA}</Iptc4xmpExt:DigitalSourceType>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(description)}</rdf:li></rdf:Alt>'
        "</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
    )


class Renderer:
    """A checkpoint's G_ema with the options of one ``generate`` call: images and latents by seed."""

    def __init__(
        self,
        checkpoint: str | Path,
        truncation: float | None = None,
        class_index: int | None = None,
        device: str = "cpu",
    ):
        loaded = load_generator(checkpoint, device)
        self.G, self.arch, self.spec, progress = loaded.G, loaded.arch, loaded.spec, loaded.progress
        self.device, self.truncation, self.class_index = device, truncation, class_index
        caps = self.arch.capabilities
        self.kwargs: dict[str, object] = {}
        self.truncate_z = False  # BigGAN: truncation resamples z (G.truncated_latents), G's forward is unchanged
        if truncation is not None:
            if caps.truncation == "psi":
                self.kwargs["truncation_psi"] = truncation
            elif caps.truncation == "resample":
                if truncation <= 0:
                    raise ConfigError(
                        f"--truncation {truncation}: the {self.arch.name} truncation threshold must be positive"
                    )
                self.truncate_z = True
            else:
                raise ConfigError(f"--truncation: the {self.arch.name} generator has no truncation trick; leave it out")
        if caps.noise_inputs:
            self.kwargs["noise_mode"] = "const"  # the same seed gives the same image
        n = self.spec.num_classes
        if class_index is not None and not 0 <= class_index < n:
            raise ConfigError(
                f"--class {class_index}: this model has {n} classes"
                + (" (it is unconditional)" if not n else f"; use 0-{n - 1}")
            )
        self.provenance = Provenance.of(checkpoint, self.arch.name, progress)

    @property
    def has_mapping(self) -> bool:
        """Whether G is mapping + synthesis (StyleGAN2): W-space interpolation applies."""
        return self.arch.capabilities.mapping

    def latent(self, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``z [1, z_dim]`` and the class ``c [1]`` (None if unconditional) of a seed (see the module docstring)."""
        if self.has_mapping:
            return self._official_latent(seed)
        g = torch.Generator().manual_seed(seed)
        if self.truncate_z:
            z = self.G.truncated_latents(1, self.truncation, generator=g).to(self.device)
        else:
            z = torch.randn(1, self.G.z_dim, generator=g).to(self.device)
        if not self.spec.num_classes:
            return z, None
        c = self.class_index
        if c is None:  # drawn after z from the same generator: the seed fixes the class too
            c = int(torch.randint(self.spec.num_classes, (1,), generator=g))
        return z, torch.tensor([c], device=self.device)

    def _official_latent(self, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        rs = np.random.RandomState(seed)
        # float64 as drawn; the mapping network's first step is z.to(float32), as the official code's
        z = torch.from_numpy(rs.randn(1, self.G.z_dim)).float().to(self.device)
        if not self.spec.num_classes:
            return z, None
        c = self.class_index if self.class_index is not None else int(rs.randint(self.spec.num_classes))
        return z, torch.tensor([c], device=self.device)

    @torch.no_grad()
    def image(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """``G_ema(z, c)`` as one ``[C, H, W]`` image in [-1, 1]."""
        return self.G(z, c, **self.kwargs).float().clamp(-1, 1)[0]

    @torch.no_grad()
    def w(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The (truncated) intermediate latent ``ws`` of a mapping-network generator."""
        return self.G.mapping(z, c, truncation_psi=self.truncation if self.truncation is not None else 1)

    @torch.no_grad()
    def image_from_w(self, ws: torch.Tensor) -> torch.Tensor:
        """The synthesis network's image of ``ws``, ``[C, H, W]`` in [-1, 1]."""
        kw = {"noise_mode": "const"} if self.arch.capabilities.noise_inputs else {}
        return self.G.synthesis(ws, **kw).float().clamp(-1, 1)[0]

    def params(self, c: torch.Tensor | None) -> dict[str, object]:
        """Metadata of an image's options: ψ and class."""
        p: dict[str, object] = {"truncation_psi": self.truncation if self.truncation is not None else "none"}
        if c is not None:
            p["class"] = int(c[0])
        return p


def _save_png(img: Image.Image, path: Path, info: PngInfo) -> Path:
    img.save(path, pnginfo=info)
    return path


def generate(
    checkpoint: str | Path,
    out: str | Path,
    num: int = 16,
    seed: int = 0,
    truncation: float | None = None,
    class_index: int | None = None,
    device: str = "cpu",
    seeds: list[int] | None = None,
) -> list[Path]:
    """Write ``seed<S>.png`` for each seed and ``grid.png`` of them all to ``out``; return the paths (grid last).

    The seeds are ``seeds`` if given, else ``seed … seed+num-1``. ``truncation`` is ψ (generators with a mapping
    network: ``w_avg + ψ(w − w_avg)``; BigGAN: every entry of z with ``|z| > ψ`` is resampled); ``class_index``
    fixes the class of a conditional model (default: drawn from each image's seed).
    """
    seeds = list(seeds) if seeds is not None else list(range(seed, seed + num))
    if not seeds:
        raise ConfigError("generate: no seeds (--num must be at least 1)")
    s = Renderer(checkpoint, truncation, class_index, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, images, classes = [], [], []
    for sd in seeds:
        z, c = s.latent(sd)
        img = s.image(z, c)
        images.append(img)
        classes.append(None if c is None else int(c[0]))
        paths.append(
            _save_png(
                to_pil(img), out / f"seed{sd:04d}.png", s.provenance.pnginfo(f"seed {sd}", seed=sd, **s.params(c))
            )
        )
    grid_params: dict[str, object] = {"seeds": format_seeds(seeds), **s.params(None)}
    if s.spec.num_classes:
        grid_params["classes"] = ",".join(map(str, classes))
    ncol = max(1, int(len(images) ** 0.5))
    info = s.provenance.pnginfo(f"grid of seeds {format_seeds(seeds)}, {ncol} per row", **grid_params)
    paths.append(_save_png(to_pil(make_grid(images, ncol)), out / "grid.png", info))
    return paths


def interpolate(
    checkpoint: str | Path,
    out: str | Path,
    seed_a: int,
    seed_b: int,
    steps: int = 8,
    truncation: float | None = None,
    class_index: int | None = None,
    space: Space = "auto",
    device: str = "cpu",
    frame_ms: int = 100,
) -> list[Path]:
    """Write ``steps`` frames between the latents of two seeds, a strip of them and an animated GIF.

    ``space="z"`` slerps the Gaussian latents; ``"w"`` (generators with a mapping network) interpolates
    linearly in W, the StyleGAN convention; ``"auto"`` is ``"w"`` where there is a mapping network, else
    ``"z"``. The end frames are exactly the images :func:`generate` writes for the two seeds (in W space up
    to floating point). A conditional model needs ``class_index``: both ends share one class. Returns the
    frame paths, then the strip ``interp-A-B.png`` and the GIF ``interp-A-B.gif``.
    """
    if steps < 2:
        raise ConfigError(f"--steps {steps}: an interpolation needs at least 2 frames (its two ends)")
    s = Renderer(checkpoint, truncation, class_index, device)
    if space == "auto":
        space = "w" if s.has_mapping else "z"
    if space == "w" and not s.has_mapping:
        raise ConfigError(f"--space w: the {s.arch.name} generator has no mapping network; use --space z")
    if s.spec.num_classes and class_index is None:
        raise ConfigError(
            f"--interpolate: this model is class-conditional ({s.spec.num_classes} classes); "
            f"pass --class to choose the class both ends share"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (za, c), (zb, _) = s.latent(seed_a), s.latent(seed_b)
    if space == "w":
        wa, wb = s.w(za, c), s.w(zb, c)
    ts = [i / (steps - 1) for i in range(steps)]
    frames = [s.image_from_w(torch.lerp(wa, wb, t)) if space == "w" else s.image(slerp(za, zb, t), c) for t in ts]

    stem = f"interp-{seed_a:04d}-{seed_b:04d}"
    width = max(2, len(str(steps - 1)))
    what = f"interpolation from seed {seed_a} to seed {seed_b} ({'slerp in Z' if space == 'z' else 'linear in W'})"
    common = dict(interpolate=f"{seed_a},{seed_b}", space=space, steps=steps, **s.params(c))
    paths = [
        _save_png(
            to_pil(img),
            out / f"{stem}-{i:0{width}d}.png",
            s.provenance.pnginfo(f"{what}, frame {i} of {steps} (t={t:.4g})", t=f"{t:.6g}", **common),
        )
        for i, (img, t) in enumerate(zip(frames, ts))
    ]
    ncol = min(steps, 16)
    paths.append(
        _save_png(
            to_pil(make_grid(frames, ncol)),
            out / f"{stem}.png",
            s.provenance.pnginfo(f"{what}, {steps} frames, {ncol} per row", **common),
        )
    )
    gif = out / f"{stem}.gif"
    pil = [to_pil(f) for f in frames]
    pil[0].save(
        gif,
        save_all=True,
        append_images=pil[1:],
        duration=frame_ms,
        loop=0,
        comment=s.provenance.gif_comment(f"{what}, {steps} frames"),
    )
    paths.append(gif)
    return paths


def read_inputs(source: Path) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, str]]]:
    """The images of a file or a folder (sorted, not recursive) as ``(name, image)``, and the files that were
    skipped as ``(name, reason)``."""
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    images, skipped = [], []
    for f in files:
        try:
            img = Image.open(f)
            img.load()
            images.append((f.name, img))
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            skipped.append((f.name, f"not a readable image ({type(e).__name__})"))
    return images, skipped


def translate(
    checkpoint: str | Path, source: str | Path, out: str | Path, direction: str = "ab", device: str = "cpu"
) -> list[Path]:
    """Run an image → image checkpoint's G on an image or a folder of images: ``<name>.png`` per input and
    ``grid.png`` of input | output pairs, labelled as synthetic; return the paths (grid last).

    Inputs are converted to the model's input channels; Pix2Pix and CycleGAN inputs are centre-cropped and resized
    to the size the model was trained on, super-resolution inputs keep their size (G is fully convolutional).
    ``direction``: ``ab`` (what ``G`` does) or ``ba`` (CycleGAN's B → A generator).
    """
    from orchestrator.data.sources import prepare_image
    from orchestrator.recipes.image_to_image import as_shown

    loaded = load_generator(checkpoint, device)
    G, spec, caps = loaded.G, loaded.spec, loaded.arch.capabilities
    if not spec.translates:
        raise ConfigError(f"--input: {checkpoint} generates from noise ({loaded.arch.name}); use --seeds instead")
    if direction == "ba" and not caps.cycle:
        raise ConfigError(f"--direction ba: the {loaded.arch.name} model translates one way only (A → B)")
    net = G.ba if direction == "ba" else G
    channels = spec.channels if direction == "ba" else spec.input_channels
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"--input {source} does not exist; give an image file or a folder of images")
    images, skipped = read_inputs(source)
    for name, why in skipped:
        print(f"skipped {source / name if source.is_dir() else name}: {why}")
    if not images:
        raise ConfigError(f"--input {source}: no readable image")
    provenance = Provenance.of(checkpoint, loaded.arch.name, loaded.progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, shown = [], []
    superres = spec.input_resolution < spec.resolution
    for name, img in images:
        if superres:
            img = img.convert("L" if channels == 1 else "RGB")
        else:
            img = prepare_image(img, spec.input_resolution, channels)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div(127.5).sub(1)
        x = (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None].to(device)
        with torch.no_grad():
            y = net(x).float().clamp(-1, 1)[0]
        what = f"{'B → A' if direction == 'ba' else 'translation'} of input image {name}"
        paths.append(_save_png(to_pil(y), out / f"{Path(name).stem}.png",
                               provenance.pnginfo(what, input=name, direction=direction)))  # fmt: skip
        shown += [as_shown(x.cpu(), y.shape[-1])[0], as_shown(y[None].cpu(), y.shape[-1])[0]]
    info = provenance.pnginfo(f"grid of {len(images)} inputs and their outputs, input | output", direction=direction)
    paths.append(_save_png(to_pil(make_grid(shown, 2 * max(1, int(len(images) ** 0.5)))), out / "grid.png", info))
    return paths
