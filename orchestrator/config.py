"""The job's config: YAML plus ``--set section.key=value`` overrides, validated by pydantic.

Every component owns a small typed config next to its code (``DataConfig`` in ``data``,
``LossConfig`` in ``losses``, …); :class:`JobConfig` only puts them side by side, and each component
receives its own section. The ``model`` section is the config of the family named by ``model.arch``
(looked up in the architecture registry). Errors name the file (and line), the key, the value, and
for unknown keys the nearest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

import architectures
from architectures.registry import REGISTRY
from core.config import ConfigError, StrictConfig
from orchestrator import recipes  # noqa: F401  (registers the built-in recipes)
from orchestrator.augment.control import AugmentConfig
from orchestrator.checkpoint import CheckpointConfig
from orchestrator.data.shards import DataConfig
from orchestrator.dist.ray_config import RayConfig
from orchestrator.dist.strategy import DistributedConfig
from orchestrator.ema import EMAConfig
from orchestrator.eval.evaluator import EvalConfig
from orchestrator.faults import FaultConfig
from orchestrator.finetune import FinetuneConfig
from orchestrator.growth import GrowthConfig
from orchestrator.health import HealthConfig
from orchestrator.losses import LossConfig
from orchestrator.optim import OptimConfig
from orchestrator.precision import PrecisionName
from orchestrator.recipes.cyclegan import CycleGANOptions
from orchestrator.recipes.pix2pix import Pix2PixOptions
from orchestrator.recipes.recipe import RECIPES
from orchestrator.recipes.srgan import SRGANOptions
from orchestrator.tracking import TrackingConfig

ModelConfig = Annotated[Union[tuple(a.config for a in REGISTRY.values())], Field(discriminator="arch")]

DEEPSPEED_KEYS = (
    "zero_optimization",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "amp",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "zero_allow_untested_optimizer",
    "activation_checkpointing",
    "torch_autocast",
)


class TrainConfig(StrictConfig):
    """Length, batch, seed, precision and device of a run."""

    batch_size: int = Field(64, ge=1, description="global batch: images per D step, all workers together")
    micro_batch: int | None = Field(
        None,
        ge=1,
        description="images per worker per forward pass (default: "
        "batch_size / workers); batch_size / (workers × micro_batch) micro-batches are accumulated",
    )
    total_kimg: float = Field(100.0, gt=0, description="train until this many thousand real images were shown to D")
    stop_at_step: int | None = Field(
        None, ge=1, description="stop early after this step, with a checkpoint (resume continues)"
    )
    seed: int = Field(0, description="seeds the networks' init, latents and data order")
    precision: PrecisionName = Field(
        "fp32", description="fp32 | bf16 | fp16 (fp16 needs CUDA; fp32 is the CPU default)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads per worker (default: torch's choice)")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the trained networks (in place); regularizers that need a double backward (R1, "
        "path length, gradient penalty) run the same modules eagerly. single and ddp strategies. auto: on for "
        "CUDA devices (where the compile time pays back within minutes), off on CPU, under deepspeed and for "
        "growing families",
    )
    recipe: str = Field(
        "noise_to_image",
        description="the GAN kind's recipe: its networks and phases "
        "(orchestrator/recipes/): noise_to_image (mlp, dcgan, stylegan2, biggan, progan), pix2pix, cyclegan, srgan",
    )

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        if v not in RECIPES:
            raise ValueError(f"unknown recipe {v!r}; known: {', '.join(sorted(RECIPES))}")
        return v


class JobConfig(StrictConfig):
    """Everything one training job needs, one section per component."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    health: HealthConfig = HealthConfig()
    growth: GrowthConfig = GrowthConfig()
    faults: FaultConfig = FaultConfig()
    augment: AugmentConfig = AugmentConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    pix2pix: Pix2PixOptions = Pix2PixOptions()
    cyclegan: CycleGANOptions = CycleGANOptions()
    srgan: SRGANOptions = SRGANOptions()

    def to_yaml(self) -> str:
        """The resolved config as YAML (every default filled in)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.batch_size=32'`` → ``(['train', 'batch_size'], 32)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.batch_size=32")
    return key.split("."), yaml.safe_load(value) if value.strip() else None


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Read, override and validate a YAML config; raise :class:`ConfigError` with readable messages."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, data:, train:, …), got {type(raw).__name__}"
        )
    _refuse_deepspeed_config(raw, path)
    override_paths = []
    for text_override in overrides:
        key, value = parse_override(text_override)
        apply_override(raw, key, value)
        override_paths.append(key)
    return validate_config(raw, source=str(path), yaml_text=text, override_paths=override_paths)


def _refuse_deepspeed_config(raw: dict, path: Path) -> None:
    """A DeepSpeed config given where a job config belongs: say so, and where it goes."""
    found = [k for k in DEEPSPEED_KEYS if k in raw]
    if found and not any(k in JobConfig.model_fields for k in raw):
        raise ConfigError(
            f"{path} is a DeepSpeed config (top-level {', '.join(found)}), not a ganforge job config; "
            f"use it from a job config as distributed.deepspeed_config: {path} "
            f"(with distributed.strategy: deepspeed)"
        )


def config_from_yaml_text(text: str, source: str) -> JobConfig:
    """A config saved in a run directory or checkpoint."""
    return validate_config(yaml.safe_load(text), source=source, yaml_text=text)


def validate_config(raw: dict, source: str, yaml_text: str = "", override_paths: list[list[str]] = ()) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err, source, yaml_text, override_paths) for err in e.errors()]
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None


def _describe(err: dict, source: str, yaml_text: str, override_paths) -> str:
    loc = [str(p) for p in err["loc"]]
    keys = _without_union_tag(loc)
    dotted = ".".join(keys)
    where = next((f"--set {'.'.join(p)}" for p in override_paths if keys[: len(p)] == p), None)
    if where is None:
        line = _yaml_line(yaml_text, keys)
        where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = sorted(model.model_fields) if model else []
        near = difflib.get_close_matches(keys[-1], valid, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{where}: unknown key {dotted!r}{hint} (valid keys here: {', '.join(valid)})"
    if err["type"] == "missing":
        return f"{where}: {dotted}: required key is missing"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = err.get("input", {}).get("arch") if isinstance(err.get("input"), dict) else None
        near = difflib.get_close_matches(str(tag), list(REGISTRY), n=1) if tag else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return (
            f"{where}: {dotted}.arch: {tag!r} is not a known architecture{hint} (known: {', '.join(sorted(REGISTRY))})"
        )
    if err["type"] in _EXPECTED:
        return f"{where}: {dotted}: {_wrong_type(err['type'], err.get('input'))}"
    return f"{where}: {dotted}: {err['msg']} (got {err.get('input')!r})"


_EXPECTED = {
    "int_type": ("an integer", int),
    "float_type": ("a number", (int, float)),
    "bool_type": ("true or false", bool),
}


def _wrong_type(kind: str, value: Any) -> str:
    """``expected a number, not the string '100' (write it without quotes: 100)``."""
    expected, types = _EXPECTED[kind]
    if isinstance(value, str):
        try:
            unquoted = yaml.safe_load(value)
        except yaml.YAMLError:
            unquoted = None
        fits = isinstance(unquoted, types) and isinstance(unquoted, bool) == (types is bool)
        hint = f" (write it without quotes: {value})" if fits else ""
        return f"expected {expected}, not the string {value!r}{hint}"
    if isinstance(value, (bool, int, float)):
        return f"expected {expected}, not the {'boolean' if isinstance(value, bool) else 'number'} {value!r}"
    return f"expected {expected}, not {'an empty value' if value is None else 'a ' + type(value).__name__}"


def _without_union_tag(loc: list[str]) -> list[str]:
    """Pydantic puts the discriminator's value in the path of a union member: ``model.dcgan.z_dim``."""
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in REGISTRY:
        return [loc[0]] + loc[2:]
    return loc


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The config class at a pydantic error path, e.g. ``['optim', 'g']`` → ``AdamConfig``."""
    cls: type[BaseModel] = JobConfig
    i = 0
    while i < len(loc):
        if cls is JobConfig and loc[i] == "model":
            if i + 1 < len(loc) and loc[i + 1] in REGISTRY:
                cls, i = REGISTRY[loc[i + 1]].config, i + 2
                continue
            return None
        field = cls.model_fields.get(loc[i])
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls, i = ann, i + 1
    return cls


def _yaml_line(text: str, keys: list[str]) -> int | None:
    """1-based line of the deepest key of ``keys`` present in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == key), None)
        if match is None:
            break
        line, node = match[0].start_mark.line + 1, match[1]
    return line


def config_diff(old: JobConfig, new: JobConfig) -> list[str]:
    """Keys whose values differ between two configs, as ``key: old → new`` lines."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["JobConfig", "ConfigError", "load_config", "config_from_yaml_text", "config_diff", "architectures"]
