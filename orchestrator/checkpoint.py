"""Checkpoints: one directory per save, written atomically, verified on load, never unpickling code.

A checkpoint ``ckpt-<step>/`` holds ``state.pt`` (every piece of training state: nets, optimizers,
EMA, scaler, counters, RNG states, data position), ``config.yaml`` (the resolved config) and, last,
``COMPLETE.json`` with the sha256 of the other files. It is written under a temporary name and
renamed into place, so a crash mid-write leaves the previous checkpoints as they were and no
half-written directory is ever picked: only directories with a ``COMPLETE.json`` count, and their
checksums are verified before loading. ``state.pt`` is read with ``torch.load(weights_only=True)``.

What ``state.pt`` holds is exactly what the run registered in its :class:`StateRegistry` (name → object
with ``state_dict``/``load_state_dict``), including ``meta``: the image spec, model and recipe, so that
:func:`load_generator` rebuilds the sampling network from the checkpoint alone. :func:`read_checkpoint`
is the one reader; the Run, ``generate``, ``eval`` and the Ray glue all go through it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import architectures
from architectures.registry import ArchConfig, Architecture
from core.config import StrictConfig
from core.spec import ImageSpec
from orchestrator.data.write import sha256_file

STATE, CONFIG, COMPLETE, BEST = "state.pt", "config.yaml", "COMPLETE.json", "BEST"
META = "meta"  # the state entry that describes the run (see Checkpoint)
NAME = re.compile(r"^ckpt-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded; the message names the path."""


class CheckpointConfig(StrictConfig):
    """When to save and how many to keep."""

    every_kimg: float = Field(50.0, gt=0, description="save every this many thousand images")
    keep_last: int = Field(3, ge=1, description="keep this many newest checkpoints (plus any marked best)")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its ``torch.save`` file."""
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def save_checkpoint(
    run_dir: Path, step: int, state: dict[str, Any], config_yaml: str, keep_last: int, extra: Path | None = None
) -> Path:
    """Write ``ckpt-<step>`` atomically, then prune old ones; returns its path. ``extra``: a directory
    whose contents (e.g. DeepSpeed's sharded files) move into the checkpoint and are checksummed too.

    Refuses to start (and says how much space it needs) when the filesystem has too little room; if a
    write fails anyway (disk full, I/O error), the partial directory is removed. Either way the previous
    checkpoints stay as they were."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    needed = state_nbytes(state) + len(config_yaml) + 2**16
    if extra is not None:
        needed += sum(f.stat().st_size for f in extra.rglob("*") if f.is_file())
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"not enough space for checkpoint {final}: it needs about {needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free there; free some space or use another --run-dir, "
            f"then resume. The previous checkpoints are untouched"
        )
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        (tmp / CONFIG).write_text(config_yaml)
        if extra is not None:
            for item in extra.iterdir():
                item.rename(tmp / item.name)
            extra.rmdir()
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        for p in files:
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        with open(tmp / COMPLETE, "w") as f:
            json.dump({"step": step, "sha256": sums, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step after a resume: swap it out, then delete it
            old = root / f".old-{final.name}-{time.monotonic_ns()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free if root.exists() else 0
        raise CheckpointError(
            f"cannot write checkpoint {final}: {e} (it needs about {needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free there); the previous checkpoints are untouched"
        ) from e
    prune(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (those with ``COMPLETE.json``), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: p.name)


def mark_best(path: Path, info: dict) -> None:
    """Protect a checkpoint from pruning (e.g. the best FID so far) and unmark the others."""
    for other in list_checkpoints(path.parent.parent):
        (other / BEST).unlink(missing_ok=True)
    (path / BEST).write_text(json.dumps(info))


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and those marked best, plus leftovers
    of interrupted writes."""
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[:-keep_last]:
        if not (p / BEST).exists():
            shutil.rmtree(p, ignore_errors=True)
    for p in [*checkpoint_dir(run_dir).glob(".tmp-ckpt-*"), *checkpoint_dir(run_dir).glob(".shards-*")]:
        shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is complete and its files match their checksums."""
    marker = path / COMPLETE
    if not marker.exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE}); it was probably cut off mid-write")
    try:
        sums = json.loads(marker.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker} is unreadable ({e})") from None
    if not isinstance(sums, dict) or STATE not in sums or CONFIG not in sums:
        raise CheckpointError(
            f"{marker} does not list the checksums of {STATE} and {CONFIG}: not written by ganforge "
            f"or altered; the checkpoint is not loaded unverified"
        )
    for name, want in sums.items():
        f = path / name
        if not f.exists() or sha256_file(f) != want:
            raise CheckpointError(f"{f} is missing or does not match its checksum in {COMPLETE}: truncated or altered")


def checkpoint_step(path: Path | None) -> int:
    """The step a complete checkpoint was written at (-1 for None or an incomplete one)."""
    if path is None or not (Path(path) / COMPLETE).exists():
        return -1
    return int(json.loads((Path(path) / COMPLETE).read_text())["step"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose checksums verify, skipping (and naming) broken ones."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            print(f"warning: skipping checkpoint: {e}", flush=True)
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify and load ``state.pt`` of a checkpoint directory with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    verify(path)
    try:
        return torch.load(path / STATE, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state is reported with its path
        raise CheckpointError(f"cannot read {path / STATE}: {e}") from None


def state_mismatches(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` differs from a module's ``own`` state dict: the keys missing from it, the keys only it has,
    and ``"key: checkpoint (shape) vs model (shape)"`` for each key whose shapes differ (each list sorted)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    return missing, unexpected, shapes


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` with an error that lists missing, unexpected and mis-shaped keys."""
    missing, unexpected, shapes = state_mismatches(module.state_dict(), state)
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:10]}" if missing else "",
            f"unexpected {unexpected[:10]}" if unexpected else "",
            f"shape mismatch {shapes[:10]}" + (f" and {len(shapes) - 10} more" if len(shapes) > 10 else "")
            if shapes
            else "",
        ]
        raise CheckpointError(
            f"{what} in the checkpoint does not fit this config's network: "
            + "; ".join(p for p in parts if p)
            + " (another architecture or config?)"
        )
    module.load_state_dict(state)


class StateRegistry:
    """Everything that must survive a restart, each registered once under its name (an object with
    ``state_dict`` / ``load_state_dict``). The checkpoint writer saves exactly :meth:`state_dict`; the one
    reader restores exactly what was registered, and a checkpoint missing a piece is an error naming it."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        """Add ``obj`` under ``name`` (names are unique)."""
        if name in self._items:
            raise ValueError(f"state {name!r} is registered twice")
        self._items[name] = obj

    def state_dict(self) -> dict[str, Any]:
        """Every registered object's state (a collective call when an object gathers across ranks)."""
        return {name: obj.state_dict() for name, obj in self._items.items()}

    def load_state_dict(self, states: dict[str, Any], source: Path) -> None:
        """Restore every registered object from ``states`` (read from checkpoint ``source``)."""
        missing = [name for name in self._items if name not in states]
        if missing:
            raise CheckpointError(
                f"{source} holds no state for {missing}: it was written by another recipe, "
                f"strategy or ganforge version than this run's"
            )
        for name, obj in self._items.items():
            obj.load_state_dict(states[name])


class ModuleState:
    """A network in the state registry: its raw module's state dict, loaded with a readable mismatch error."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.module, self.name = module, name

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        load_into(self.module, state, self.name)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint read back: its directory, the registered states, and ``meta`` (what the run
    was: image spec, model, recipe, config), which makes it usable without the training data."""

    path: Path
    states: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.states[META]

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec.from_dict(self.meta["spec"])


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The one checkpoint reader: verify, load (``weights_only=True``) and check that it carries ``meta``."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    states = load_checkpoint(path, map_location)
    if not isinstance(states.get(META), dict) or "spec" not in states[META]:
        raise CheckpointError(
            f"{path} carries no run description ({META!r}): it was written by an older ganforge; "
            f"resume or sample it with that version"
        )
    return Checkpoint(path, states)


@dataclass
class LoadedGenerator:
    """A checkpoint's sampling network, ready to run, and what it was trained as."""

    G: torch.nn.Module
    arch: Architecture
    model: ArchConfig
    spec: ImageSpec
    checkpoint: Checkpoint

    @property
    def progress(self) -> dict:
        return self.checkpoint.states.get("progress", {})


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> LoadedGenerator:
    """The generator samples come from (G_ema) of a checkpoint, built from the description it carries (no data,
    no config file needed), at the level of detail it had reached, in eval mode without gradients."""
    ckpt = read_checkpoint(path, map_location=device)
    meta = ckpt.meta
    arch = architectures.get(meta["arch"])
    model = arch.config.model_validate(meta["model"])
    G = arch.build_generator(model, ckpt.spec).to(device)
    load_into(G, ckpt.states[meta["generator"]], meta["generator"])
    if meta.get("level") and arch.capabilities.growth:
        G.set_lod(*meta["level"])
    return LoadedGenerator(G.eval().requires_grad_(False), arch, model, ckpt.spec, ckpt)
