"""Image sources for the shard writers: an image folder (labels from subfolders), a .zip of one, an .npz or a
built-in set, read as PIL images (``read_source``) and prepared for a shard (``prepare_image``). Files that are
not readable images are skipped and listed with their reason.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from orchestrator.data.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class SourceImages:
    """Images read from a source, before resizing: PIL images, class indices (or None) and names, and the
    files that were skipped as ``(file, reason)``."""

    images: list[Image.Image]
    labels: list[int] | None
    class_names: list[str]
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def label(self, i: int) -> int | None:
        """Image ``i``'s class index, or None for unlabelled data."""
        return None if self.labels is None else self.labels[i]


BUILTINS = {
    "builtin:digits": "scikit-learn's 1,797 handwritten digits, 8×8 grey, labelled 0–9",
    "builtin:digits-edges": "Canny edge maps of those digits (upsampled to 32×32), grey, same keys and labels",
    "builtin:digits-m": "MNIST-M-style colour digits (digit over a photo patch), 32×32 RGB, same keys and labels",
    "builtin:stacked-digits": "30,000 RGB images of three digits, one per channel; labelled by the 1,000 modes 000–999",
    "builtin:photos": "scikit-image's bundled colour photos (astronaut, coffee, …), RGB, keyed by name",
}


def read_source(source: str) -> SourceImages:
    """Read an image folder (labels from subfolders), a .zip of one, an .npz, or a built-in set:
    ``builtin:digits``, ``builtin:digits-edges``, ``builtin:digits-m``, ``builtin:stacked-digits`` or
    ``builtin:photos`` (see ``BUILTINS``)."""
    if source.startswith("builtin:"):
        return _from_builtin(source)
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data source {source} does not exist; give an image folder, a .zip, an .npz or one of {', '.join(BUILTINS)}"
        )
    if path.is_dir():
        files = {str(p.relative_to(path)): p.read_bytes for p in sorted(path.rglob("*")) if not p.is_dir()}
        return _from_named_files(source, files)
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                files = {n: (lambda n=n: zf.read(n)) for n in sorted(zf.namelist()) if not n.endswith("/")}
                return _from_named_files(source, files)
        except zipfile.BadZipFile as e:
            raise DataError(f"{source} is not a readable .zip ({e})") from None
    if path.suffix == ".npz":
        return _from_npz(path)
    raise DataError(f"cannot read {source}: expected a folder, a .zip, an .npz or one of {', '.join(BUILTINS)}")


def _from_builtin(source: str) -> SourceImages:
    """A built-in data set (no download); the digit sets share keys ``digits-NNNNN`` and labels."""
    from orchestrator.data import builtins

    if source not in BUILTINS:
        raise DataError(f"unknown built-in data set {source!r}; available: {', '.join(BUILTINS)}")
    try:
        if source == "builtin:photos":
            photos = builtins.photos()
            return SourceImages([Image.fromarray(photos[n]) for n in sorted(photos)], None, [], sorted(photos))
        if source == "builtin:stacked-digits":
            return _stacked_digits()
        arrays = {
            "builtin:digits": lambda: builtins.digits()[0],
            "builtin:digits-edges": builtins.digits_edges,
            "builtin:digits-m": lambda: builtins.digits_m()[0],
        }[source]()
    except builtins.BuiltinUnavailable as e:
        raise DataError(f"{source} {e}") from None
    labels = builtins.digits()[1]
    return SourceImages(
        [Image.fromarray(x) for x in arrays],
        [int(t) for t in labels],
        [str(n) for n in range(10)],
        [f"digits-{i:05d}" for i in range(len(arrays))],
    )


def _stacked_digits() -> SourceImages:
    """``builtin:stacked-digits``: keys ``stacked-00000`` …, labels the modes, class names ``000`` … ``999``."""
    from orchestrator.data import builtins

    images, modes, _ = builtins.stacked_digits()
    return SourceImages(
        [Image.fromarray(x) for x in images],
        [int(m) for m in modes],
        [f"{m:03d}" for m in range(1000)],
        [f"stacked-{i:05d}" for i in range(len(images))],
    )


def _from_named_files(source: str, files: dict[str, Any]) -> SourceImages:
    """Images keyed by relative path; the first path component is the class when every image has one.

    Every file is tried; a file that is not an image or cannot be read is skipped with its reason."""
    images, keys, skipped = [], [], []
    for name, read in files.items():
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            skipped.append((name, f"not an image file ({f'extension {suffix}' if suffix else 'no extension'})"))
            continue
        try:
            img = Image.open(io.BytesIO(read()))
            img.load()
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            skipped.append((name, f"not a readable image ({error_text(e)})"))
            continue
        images.append(img)
        keys.append(name)
    if not images:
        raise DataError(
            f"no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}"
            + (f"; skipped {len(skipped)} file(s):{skipped_lines(skipped)}" if skipped else "")
        )
    labelled = all(len(Path(n).parts) >= 2 for n in keys)
    class_names = sorted({Path(n).parts[0] for n in keys}) if labelled else []
    labels = [class_names.index(Path(n).parts[0]) for n in keys] if labelled else None
    return SourceImages(images, labels, class_names, keys, skipped)


def error_text(e: Exception) -> str:
    """An exception's message without Python object reprs such as ``<_io.BytesIO object at 0x7f…>``."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def skipped_lines(skipped: list[tuple[str, str]]) -> str:
    """One indented ``file: reason`` line per skipped file, each after a newline."""
    return "".join(f"\n  {name}: {reason}" for name, reason in skipped)


def _from_npz(path: Path) -> SourceImages:
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        img_key = next((k for k in ("images", "x", "arr_0") if k in z), None)
        if img_key is None:
            raise DataError(f"{path}: no image array; expected a key 'images' (N×H×W or N×H×W×C uint8), found {keys}")
        arr = z[img_key]
        lab_key = next((k for k in ("labels", "y") if k in z), None)
        labels = [int(v) for v in z[lab_key]] if lab_key else None
        names = (
            [str(n) for n in z["class_names"]]
            if "class_names" in z
            else ([str(i) for i in range(max(labels) + 1)] if labels else [])
        )
        named = "class_names" in z
    out_of_range = [(i, v) for i, v in enumerate(labels or ()) if not 0 <= v < len(names)]
    if out_of_range:
        i, v = out_of_range[0]
        more = f" (and {len(out_of_range) - 1} more)" if len(out_of_range) > 1 else ""
        classes = f"{len(names)} class_names" if named else "classes 0 to the largest label"
        raise DataError(
            f"{path}: {lab_key}[{i}] is {v}, outside [0, {len(names)}) ({classes}){more}; labels must be class indices"
        )
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # N×C×H×W → N×H×W×C
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.round((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4):
        raise DataError(f"{path}: '{img_key}' has shape {arr.shape}; expected N×H×W or N×H×W×C")
    if labels is not None and len(labels) != len(arr):
        raise DataError(f"{path}: {len(arr)} images but {len(labels)} labels")
    images = [Image.fromarray(a) for a in arr]
    return SourceImages(images, labels, names, [f"npz-{i:07d}" for i in range(len(images))])


def prepare_image(img: Image.Image, resolution: int, channels: int) -> Image.Image:
    """Centre-crop to a square and resize to ``resolution`` with Lanczos; convert to L or RGB."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img
