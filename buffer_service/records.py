"""The trajectory record: the contract between rollout workers, reward workers, the replay service and the
learner. Plain dataclasses here; buffer_service/schema.py encodes them as versioned Arrow IPC."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trajectory:
    """One completion of one prompt, with everything needed to train on it later."""

    trajectory_id: str
    group_id: str
    prompt_id: str  # the manifest row id; media are referenced through it, never copied
    prompt_token_ids: list[int]  # the full prompt as the engine saw it (hint and media placeholders included)
    completion_token_ids: list[int]
    behaviour_logprobs: list[float]  # per completion token, from the engine at generation time
    policy_version: int  # the oldest version that sampled a token of it (what the staleness bound uses)
    completion_text: str = ""
    ref_logprobs: list[float] | None = None
    rewards: dict[str, float | None] = field(default_factory=dict)  # term -> value; None = missing (e.g. judge failed)
    reward: float = 0.0  # the stage-weighted total
    hinted: bool = False
    stage: int = 1
    truncated: bool = False  # stopped by max_new_tokens
    created_at: float = 0.0  # unix seconds at generation
    scored_at: float | None = None
    advantage: float | None = None  # set by the learner when trained; feeds the replay priority score
    mean_logratio_old_ref: float | None = None  # mean (behaviour - reference) log-prob, for the priority score
    # the version that sampled each completion token, when a weight update came in the middle of the completion
    # (rollout.weight_update in_flight); None: every token from policy_version
    token_policy_versions: list[int] | None = None

    @property
    def last_policy_version(self) -> int:
        return self.token_policy_versions[-1] if self.token_policy_versions else self.policy_version


@dataclass
class ReplaySample:
    """A trajectory drawn from the stratified tiers, with its VCRS baseline R(q) at sampling time."""

    trajectory: Trajectory
    rbar: float
    tier: str
