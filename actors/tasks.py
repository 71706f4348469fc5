"""The unit of work the driver hands to a rollout worker."""

from __future__ import annotations

from dataclasses import dataclass

from data.sample import PromptSample


@dataclass
class PromptTask:
    """One prompt to roll out: the manifest row and the driver's hint decision. `key` is unique per task
    (e.g. "<prompt id>#<pass>"), so one prompt can be scheduled again in a later pass; a task generated again
    (after a crash) keeps its key, hence its trajectory ids."""

    key: str
    sample: PromptSample
    use_hint: bool = False
    max_new_tokens: int | None = None  # this task's completion length cap; None: rollout.max_new_tokens
