"""What the parts of the replay service share: one Redis client, the key names under the service's prefix, and
the Lua scripts (buffer_service/lua/*.lua), registered once with the shared helpers (quantile rule, hint rule)
prepended to each."""

from __future__ import annotations

from pathlib import Path

import redis

from buffer_service.config import BufferConfig

_LUA = Path(__file__).parent / "lua"
SCRIPTS = ("push", "insert", "ack", "states", "reject")
KEYS = (
    "fresh",  # the fresh stream (consumer group config.consumer_group)
    "dead",  # the dead-letter stream
    "rejected",  # keys of rejected input, so each is dead-lettered once
    "seen",  # trajectory ids pushed, for idempotence
    "seen_order",  # their pushes in order, to forget the oldest past dedup_window_groups
    "stats",  # the counters
    "rbar",  # prompt id -> R(q)
    "streak",  # prompt id -> zero-reward streak
    "hinted",  # prompt ids whose hint is on
    "blob",  # tier entry -> its encoded trajectory
    "seq",  # the tiers' insertion counter
    "tiers_version",  # bumped by every insert that changed the tiers (the sampler's snapshot cache)
    "inserted",  # fresh entries already inserted into the tiers, until acknowledged
)


def _lua(name: str) -> str:
    """A script of buffer_service/lua/, with the shared helpers (quantile rule, hint rule) prepended."""
    return (_LUA / "helpers.lua").read_text() + "\n" + (_LUA / f"{name}.lua").read_text()


class Store:
    def __init__(self, config: BufferConfig, client: redis.Redis):
        self.config = config
        self.r = client
        self.prefix = config.redis.key_prefix
        self.k = {name: f"{self.prefix}:{name}" for name in KEYS}
        self.scripts = {name: client.register_script(_lua(name)) for name in SCRIPTS}

    def keys(self, *names: str) -> list[str]:
        """The Redis keys of `names`, in that order (a script's KEYS)."""
        return [self.k[name] for name in names]
