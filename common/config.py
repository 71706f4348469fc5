"""The base of every config section: an unknown key or a value of the wrong type is an error that names it, at
load time and on assignment (an override applied after load is checked too)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
