"""learner package: the AVATAR objective, the DeepSpeed learner, checkpoints and weight publishing.

Config names are imported eagerly; the rest (torch, transformers, DeepSpeed) loads on first use.
"""

from .config import LearnerConfig, LoraConfig, ObjectiveConfig

_LAZY = {"Learner": "learner", "SFTExample": "learner", "LearnerGroup": "actor", "LearnerWorker": "actor"}
_LAZY.update({n: "objective" for n in ("ObjectiveInputs", "avatar_loss", "group_advantages", "sft_loss",
                                       "step_advantages", "tas_weights")})
_LAZY.update({n: "weights" for n in ("WeightLoadError", "WeightUpdate", "make_sender", "receive",
                                     "state_dict_checksum")})
_LAZY.update({n: "weights.shared_file" for n in ("latest_published", "load_published")})

__all__ = [
    "Learner", "LearnerConfig", "LearnerGroup", "LearnerWorker", "LoraConfig", "ObjectiveConfig", "ObjectiveInputs",
    "SFTExample", "WeightLoadError", "WeightUpdate", "avatar_loss", "group_advantages", "latest_published",
    "load_published", "make_sender", "receive", "sft_loss", "state_dict_checksum", "step_advantages", "tas_weights",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
