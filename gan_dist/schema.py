"""The base of every typed config section: unknown keys are errors, assignments are validated.

It sits below everything else so that any module can declare its own section (storage options, each
architecture's model keys) without importing the job config that assembles them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
