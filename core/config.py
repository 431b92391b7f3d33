"""The base of every config section, and the error every config problem raises."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """An invalid config; the message says where and what would be valid."""


class StrictConfig(BaseModel):
    """Base of every config section in ganforge: unknown keys are errors, values are validated on
    assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
