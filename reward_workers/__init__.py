"""reward_workers: the rule-based rewards, the LLM judge, stage weighting and the RewardWorker pool.

Config and record names load eagerly; the rest (torch, Ray, vLLM behind them) on first use, so
that reading a config stays cheap."""

from .config import STAGE_WEIGHTS, JudgeConfig, RewardConfig

_LAZY = {
    "GroupContext": "rewards",
    "JUDGE_KEYS": "judge",
    "Judge": "judge",
    "JudgeEngineActor": "judge_engine",
    "JudgeError": "judge",
    "JudgeRequest": "judge",
    "JudgeResult": "judge",
    "LocalJudgeBackend": "judge_engine",
    "OpenAIJudgeBackend": "judge",
    "RewardPool": "pool",
    "RewardWorker": "pool",
    "accuracy_reward": "rewards",
    "build_judge": "pool",
    "build_judge_messages": "judge",
    "canonical_answer": "answers",
    "check_judge_model": "judge_engine",
    "choice_letter": "answers",
    "extract_answer": "answers",
    "format_reward": "rewards",
    "parse_judge_output": "judge",
    "parse_number": "answers",
    "read_judge_frames": "judge",
    "score_group": "scoring",
    "self_consistency_reward": "rewards",
    "stage_weights": "scoring",
    "start_judge_engine": "judge_engine",
}

__all__ = [
    "GroupContext",
    "JUDGE_KEYS",
    "Judge",
    "JudgeConfig",
    "JudgeEngineActor",
    "JudgeError",
    "JudgeRequest",
    "JudgeResult",
    "LocalJudgeBackend",
    "OpenAIJudgeBackend",
    "RewardConfig",
    "RewardPool",
    "RewardWorker",
    "STAGE_WEIGHTS",
    "accuracy_reward",
    "build_judge",
    "build_judge_messages",
    "canonical_answer",
    "check_judge_model",
    "choice_letter",
    "extract_answer",
    "format_reward",
    "parse_judge_output",
    "parse_number",
    "read_judge_frames",
    "score_group",
    "self_consistency_reward",
    "stage_weights",
    "start_judge_engine",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
