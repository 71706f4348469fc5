"""learner package: the AVATAR objective, the DeepSpeed learner, checkpoints and weight publishing.

Light names are imported eagerly; the learner itself (transformers, DeepSpeed) loads on first use.
"""

from .config import LearnerConfig, LoraConfig, ObjectiveConfig
from .objective import avatar_loss, group_advantages, mixed_advantages, policy_loss, sft_loss, tas_weights
from .transport import (
    CollectiveTransport,
    PublishedWeights,
    SafetensorsTransport,
    WeightTransport,
    init_weight_group,
    latest_published,
    load_published,
    receive_broadcast,
    state_dict_checksum,
)

_LAZY = {"Learner": "learner", "SFTExample": "learner", "LearnerGroup": "actor", "LearnerWorker": "actor"}

__all__ = [
    "CollectiveTransport", "Learner", "LearnerConfig", "LearnerGroup", "LearnerWorker", "LoraConfig",
    "ObjectiveConfig", "PublishedWeights", "SFTExample", "SafetensorsTransport", "WeightTransport",
    "avatar_loss", "group_advantages", "init_weight_group", "latest_published", "load_published",
    "mixed_advantages", "policy_loss", "receive_broadcast", "sft_loss", "state_dict_checksum", "tas_weights",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'learner' has no attribute {name!r}")
