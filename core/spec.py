"""What the data looks like, as the networks and every tool that rebuilds them need it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ImageSpec:
    """Square images of ``resolution`` px with ``channels`` channels and ``num_classes`` labels (0 for an
    unconditional model); ``class_names`` names the labels when the data set gave names.

    Image-to-image data (paired, unpaired, super-resolution) also has an *input* image that G maps to the
    image above: ``input_resolution`` px with ``input_channels`` channels (0: no input image; noise → image),
    and ``pairing`` says how the two relate: ``"paired"`` (each input has its target: Pix2Pix, SRGAN) or
    ``"unpaired"`` (two independent domains, input = A, image = B: CycleGAN)."""

    resolution: int
    channels: int
    num_classes: int = 0
    class_names: tuple[str, ...] = field(default=(), compare=False)
    input_resolution: int = 0
    input_channels: int = 0
    pairing: str = "none"

    @property
    def translates(self) -> bool:
        """Whether the data has an input image (image → image) rather than only images (noise → image)."""
        return self.input_channels > 0

    def to_dict(self) -> dict:
        """A plain mapping (for checkpoints and JSON)."""
        return {**asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        """The inverse of :meth:`to_dict`."""
        return cls(
            int(d["resolution"]),
            int(d["channels"]),
            int(d.get("num_classes", 0)),
            tuple(d.get("class_names") or ()),
            int(d.get("input_resolution", 0)),
            int(d.get("input_channels", 0)),
            str(d.get("pairing", "none")),
        )
