"""One narrow filter for a warning transformers raises about its own defaults.

Every Qwen2.5-Omni config (tiny or real) is checked by huggingface_hub's strict dataclass validation, which
builds `repr(talker_config)` for an error message of a union check; that repr diffs the config against a
default `Qwen2_5OmniTalkerConfig()`, and the default itself fails transformers' token-id check: its text-token
ids (151647...151861, ids of the real 151k vocabulary) lie outside its own 8448-entry codec vocabulary. So each
process that loads an Omni model logged seven "Model config: ... must be `None` or an integer within the
vocabulary (between 0 and 8447)" warnings naming values no config of ours holds (our tiny config's own talker
ids are valid: policy/tiny.py). The filter drops exactly those: the message must name a talker field and the
talker class's default value and vocabulary. Any other token-id warning, ours or a checkpoint's, still shows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re

_MESSAGE = re.compile(r"Model config: (\w+) must be `None` or an integer within the vocabulary "
                      r"\(between 0 and (-?\d+)\), got (-?\d+)\.")


@functools.cache
def _talker_defaults() -> tuple[int, dict[str, int]]:
    """(vocab_size, {field: default id}) of transformers' Qwen2_5OmniTalkerConfig, read without instantiating it."""
    from transformers import Qwen2_5OmniTalkerConfig

    fields = {f.name: f.default for f in dataclasses.fields(Qwen2_5OmniTalkerConfig)}
    ids = {k: v for k, v in fields.items() if k.endswith("_token_id") and isinstance(v, int)}
    return int(fields["vocab_size"]), ids


class TalkerDefaultsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        m = _MESSAGE.match(record.getMessage())
        if m is None:
            return True
        vocab, ids = _talker_defaults()
        name, top, value = m.group(1), int(m.group(2)), int(m.group(3))
        return not (top == vocab - 1 and ids.get(name) == value)


def quiet_talker_defaults() -> None:
    """Install the filter on transformers' config logger (idempotent; needs no transformers import)."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, TalkerDefaultsFilter) for f in logger.filters):
        logger.addFilter(TalkerDefaultsFilter())
