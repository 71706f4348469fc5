"""Configuration of the Redis-backed stratified replay service. Defaults are docs/method.md section 3."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config import StrictConfig


class RedisConfig(StrictConfig):
    url: str | None = Field(
        None, description="redis://host:port/db of an existing Redis; None = start a private one"
    )
    password: str | None = Field(None, description="password (or set AVATAR_REDIS_PASSWORD)")
    tls: bool = False
    tls_ca_certs: str | None = None
    throwaway_local: bool = Field(
        False, description="allow a Redis without a password (local experiments only)"
    )
    key_prefix: str = "avatar"


class HintConfig(StrictConfig):
    """When a prompt gets its hint (docs/method.md section 4). One rule, evaluated in the replay service whenever the
    prompt's statistics change or its state is read (buffer_service/lua/helpers.lua, update_hint)."""

    enabled: bool = True
    trigger: Literal["paper", "zero_total_streak", "zero_task_streak"] = Field(
        "paper", description="paper: in the hard tier, task-reward mean <= task_reward_max and KL to the reference "
        "<= kl_max (the policy stopped exploring); zero_total_streak: the release's rule, zero_reward_streak "
        "zero-total-reward completions in a row (rarely fires past SFT: the format term keeps totals above 0); "
        "zero_task_streak: the same streak on the task reward")
    zero_reward_streak: int = Field(
        3, ge=1, description="streak triggers: zero-reward completions in a row (whole all-zero groups) that trigger a hint"
    )
    task_reward_max: float = Field(
        0.25, ge=0, le=1, description="paper trigger: the prompt's task-reward (accuracy term) mean over its last "
        "rbar_window completions at most this")
    kl_max: float = Field(
        0.05, ge=0, description="paper trigger: the prompt's mean per-token k3 KL to the reference (from the "
        "learner, over its last rbar_window trained completions) at most this")
    min_completions: int = Field(4, ge=1, description="paper trigger: scored completions of the prompt before it can fire")
    max_rbar: float | None = Field(None, description="extra condition for every trigger: R(q) below this")
    lapse_when_not_hard: bool = Field(True, description="drop the hint once the prompt leaves the hard tier")


class BufferConfig(StrictConfig):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    capacity: int = Field(10_000, ge=3)
    tier_ratios: dict[Literal["easy", "medium", "hard"], float] = Field(
        default_factory=lambda: {"easy": 0.25, "medium": 0.35, "hard": 0.40}
    )
    hard_quantile: float = Field(0.40, ge=0, le=1)
    medium_quantile: float = Field(0.75, ge=0, le=1)
    rbar_window: int = Field(20, ge=1)
    sampling: Literal["priority", "uniform", "fifo"] = "priority"
    priority_temperature: float = Field(1.0, gt=0)
    score_adv_weight: float = 1.0
    score_kl_weight: float = 0.1
    min_size: int = Field(10, ge=0, description="replay starts once the buffer holds this many entries")
    max_age_versions: int | None = Field(None, ge=0, description="optional bound on replayed samples' age")
    hint: HintConfig = Field(default_factory=HintConfig)
    consumer_group: str = Field("learners", description="Redis Streams consumer group of the fresh stream")
    reclaim_idle_ms: int = Field(
        60_000, ge=0, description="fresh entries pending longer than this (a dead consumer's) are redelivered to "
        "a consumer reading with the default (read_fresh). Not the learner's: it is the stream's one consumer, takes "
        "back every pending entry at a run's first read and then reads new entries only"
    )
    dead_letter_maxlen: int = Field(10_000, ge=1, description="approximate bound of the dead-letter stream")
    dedup_window_groups: int = Field(
        100_000, ge=1, description="pushes whose trajectory ids are remembered for idempotence (bounds Redis memory); "
        "must exceed the groups pushed between a checkpoint's cursor and a crash, which a resume regenerates")

    @model_validator(mode="after")
    def _check(self) -> BufferConfig:
        if abs(sum(self.tier_ratios.values()) - 1.0) > 1e-6 or set(self.tier_ratios) != {
            "easy",
            "medium",
            "hard",
        }:
            raise ValueError(
                f"tier_ratios must give easy, medium and hard summing to 1, got {self.tier_ratios}"
            )
        if self.hard_quantile > self.medium_quantile:
            raise ValueError("hard_quantile must not exceed medium_quantile")
        return self
