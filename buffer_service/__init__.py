"""buffer_service: the Redis-backed stratified replay service (docs/method.md section 3).

The record schema (the contract with rollout workers, reward workers and the learner), the private/external
Redis helpers, and ReplayService (service.py), the facade over one module per job: the fresh stream
(stream.py), the stratified tiers and sampling (tiers.py), the per-prompt VCRS statistics (prompt_state.py) and
the dead-letter stream (dead_letters.py).

Config and record names load eagerly; the rest (torch, Ray, vLLM behind them) on first use, so
that reading a config stays cheap."""

from .config import BufferConfig, HintConfig, RedisConfig
from .records import ReplaySample, Trajectory

_LAZY = {
    "LocalRedis": "redis_server",
    "RecordError": "schema",
    "RedisAuthError": "redis_server",
    "ReplayService": "service",
    "SCHEMA_VERSION": "schema",
    "SchemaError": "schema",
    "TIERS": "tiers",
    "TRAJECTORY_SCHEMA": "schema",
    "allocate": "tiers",
    "connect": "redis_server",
    "decode_group": "schema",
    "decode_trajectory": "schema",
    "encode_group": "schema",
    "encode_trajectory": "schema",
    "priority_score": "tiers",
    "start_redis": "redis_server",
    "validate_group": "schema",
    "validate_trajectory": "schema",
}

__all__ = [
    "BufferConfig",
    "HintConfig",
    "LocalRedis",
    "RecordError",
    "RedisAuthError",
    "RedisConfig",
    "ReplaySample",
    "ReplayService",
    "SCHEMA_VERSION",
    "SchemaError",
    "TIERS",
    "TRAJECTORY_SCHEMA",
    "Trajectory",
    "allocate",
    "connect",
    "decode_group",
    "decode_trajectory",
    "encode_group",
    "encode_trajectory",
    "priority_score",
    "start_redis",
    "validate_group",
    "validate_trajectory",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
