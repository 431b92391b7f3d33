"""What the data looks like, as the networks and every tool that rebuilds them need it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ImageSpec:
    """Square images of ``resolution`` px with ``channels`` channels and ``num_classes`` labels (0 for an
    unconditional model); ``class_names`` names the labels when the data set gave names."""

    resolution: int
    channels: int
    num_classes: int = 0
    class_names: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict:
        """A plain mapping (for checkpoints and JSON)."""
        return {**asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        """The inverse of :meth:`to_dict`."""
        return cls(
            int(d["resolution"]), int(d["channels"]), int(d.get("num_classes", 0)), tuple(d.get("class_names") or ())
        )
