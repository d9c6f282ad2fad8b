"""The base of every typed config section: unknown keys are errors, assignments are validated.

It sits below everything else so that any module can declare its own section (storage options, each
architecture's model keys) without importing the job config that assembles them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

COMBINATION = "config_combination"  # the error type of a check across keys, which names the key to blame


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def combination_error(key: str, message: str) -> PydanticCustomError:
    """A cross-key validation error that blames the dotted ``key`` (the job config reports it so)."""
    return PydanticCustomError(COMBINATION, "{message}", {"key": key, "message": message})
