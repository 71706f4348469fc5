"""reward_workers: the rule-based rewards, the LLM judge, stage weighting and the RewardWorker pool."""

from .answers import canonical_answer, choice_letter, extract_answer, parse_number
from .config import STAGE_WEIGHTS, JudgeConfig, RewardConfig
from .judge import (
    JUDGE_KEYS,
    Judge,
    JudgeError,
    JudgeRequest,
    JudgeResult,
    OpenAIJudgeBackend,
    build_judge_messages,
    parse_judge_output,
)
from .judge_engine import JudgeEngineActor, LocalJudgeBackend
from .pool import PoolFull, RewardPool, RewardWorker, ScoredGroup, build_judge
from .rewards import GroupContext, accuracy_reward, format_reward, self_consistency_reward
from .scoring import score_group, stage_weights

__all__ = [
    "JUDGE_KEYS",
    "STAGE_WEIGHTS",
    "GroupContext",
    "Judge",
    "JudgeConfig",
    "JudgeEngineActor",
    "JudgeError",
    "JudgeRequest",
    "JudgeResult",
    "LocalJudgeBackend",
    "OpenAIJudgeBackend",
    "PoolFull",
    "RewardConfig",
    "RewardPool",
    "RewardWorker",
    "ScoredGroup",
    "accuracy_reward",
    "build_judge",
    "build_judge_messages",
    "canonical_answer",
    "choice_letter",
    "extract_answer",
    "format_reward",
    "parse_judge_output",
    "parse_number",
    "score_group",
    "self_consistency_reward",
    "stage_weights",
]
