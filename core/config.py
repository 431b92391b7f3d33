"""The base of every config section, and the error every config problem raises."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler
from pydantic_core import CoreSchema


class ConfigError(ValueError):
    """An invalid config; the message says where and what would be valid."""


def strict_scalars(schema: Any) -> Any:
    """Set ``strict`` on every int, float and bool in a pydantic core schema, except in dict keys."""
    if isinstance(schema, dict):
        if schema.get("type") in ("int", "float", "bool"):
            schema["strict"] = True
        for key, value in schema.items():
            if key != "keys_schema":
                strict_scalars(value)
    elif isinstance(schema, (list, tuple)):
        for value in schema:
            strict_scalars(value)
    return schema


class StrictConfig(BaseModel):
    """Base of every config section in ganforge: unknown keys are errors, values are validated on
    assignment too, and int, float and bool values must have their own type (pydantic's strict mode for
    these three only): a quoted ``"100"`` is not a number, ``"false"`` or ``1`` not a boolean, while an
    int is still a valid float, a list a valid tuple, and a dict key may be a string (saved configs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: type[BaseModel], handler: GetCoreSchemaHandler) -> CoreSchema:
        return strict_scalars(handler(source))
