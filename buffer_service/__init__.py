"""buffer_service: the Redis-backed stratified replay service (AVATAR.md section 3).

The record schema (the contract with rollout workers, reward workers and the learner), the private/external
Redis helpers, and ReplayService (fresh stream, stratified tiers, VCRS statistics, sampling).
"""

from buffer_service.config import BufferConfig, HintConfig, RedisConfig
from buffer_service.records import ReplaySample, Trajectory
from buffer_service.redis_server import LocalRedis, RedisAuthError, connect, start_redis
from buffer_service.schema import (
    SCHEMA_VERSION,
    TRAJECTORY_SCHEMA,
    RecordError,
    SchemaError,
    decode_group,
    decode_trajectory,
    encode_group,
    encode_trajectory,
    validate_group,
    validate_trajectory,
)
from buffer_service.service import TIERS, ReplayService, allocate, priority_score

__all__ = [
    "BufferConfig",
    "HintConfig",
    "RedisConfig",
    "ReplaySample",
    "Trajectory",
    "LocalRedis",
    "RedisAuthError",
    "connect",
    "start_redis",
    "SCHEMA_VERSION",
    "TRAJECTORY_SCHEMA",
    "RecordError",
    "SchemaError",
    "decode_group",
    "decode_trajectory",
    "encode_group",
    "encode_trajectory",
    "validate_group",
    "validate_trajectory",
    "TIERS",
    "ReplayService",
    "allocate",
    "priority_score",
]
