"""What the driver does when a call fails, decided by the exception's type (never by its text).

  RayActorError (ActorDiedError, ActorUnavailableError)  the actor died or is restarting (or its node died): a
                                                          rollout worker's tasks go to the others while it is away
                                                          (cluster/availability.py); a reward worker is waited for
  ObjectLostError (OwnerDiedError, ...)                   the data is gone with its owner: generate it again
  anything else                                           not the driver's to fix: raised (the job decides)
A group whose scoring itself failed (the scorer's answer names the error) is scored again up to
pipeline.max_scoring_retries times, then given up for this run."""

from __future__ import annotations

import ray

WORKER_LOST = "worker_lost"
DATA_LOST = "data_lost"


def classify(exc: BaseException) -> str | None:
    """WORKER_LOST, DATA_LOST, or None for a failure the driver must not absorb."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return WORKER_LOST
    if isinstance(exc, ray.exceptions.ObjectLostError):
        return DATA_LOST
    return None


class ScoringRetries:
    def __init__(self, max_retries: int):
        self.max_retries = max_retries
        self.failures: dict[str, int] = {}

    def again(self, key: str) -> bool:
        """Count one failed scoring of `key`; True while it should be scored again."""
        self.failures[key] = self.failures.get(key, 0) + 1
        return self.failures[key] <= self.max_retries
