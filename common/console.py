"""The console of the command-line tools: our packages' log records as `[module] message` lines on stdout (as
the progress lines were printed before they became log records); other libraries keep their own settings."""

from __future__ import annotations

import logging
import sys

OUR_PACKAGES = ("actors", "buffer_service", "cluster", "common", "data", "learner", "policy", "reward_workers")


class _ShortName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.short_name = record.name.rsplit(".", 1)[-1]
        return True


def configure_console(level: int = logging.INFO) -> None:
    """Idempotent: one stdout handler on each of our top-level package loggers."""
    for name in OUR_PACKAGES:
        logger = logging.getLogger(name)
        if any(getattr(h, "avatar_console", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stdout)
        handler.avatar_console = True
        handler.addFilter(_ShortName())
        handler.setFormatter(logging.Formatter("[%(short_name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
