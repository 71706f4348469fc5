"""The driver's accounting, from receipts and summaries only: the groups in the fresh stream and what the learner
has read of them (with the stale groups it dropped), and the workers' latest counters for the step's record."""

from __future__ import annotations

from reward_workers.pool import sum_worker_stats

from .committer import Committer
from .state import RunState


class StreamAccounting:
    """Groups pushed into the fresh stream (from the reward workers' receipts) and held by the learner."""

    def __init__(self, state: RunState):
        self.state = state
        self.pushed = 0  # groups that entered the stream since the learner's last read
        self.learner_held = 0  # groups the learner has read and not trained yet

    def batch_may_be_ready(self, per_step: int) -> bool:
        return self.learner_held + self.pushed >= per_step

    def learner_read(self, summary: dict, committer: Committer) -> list[str]:
        """Account for what the learner read: its held groups, the stale groups it dropped (acknowledged with the
        next checkpoint; another task takes each one's place). Returns the dropped group ids.

        The learner reads at most a batch's worth: groups pushed beyond it are still in the stream and still count
        toward the next batch (zeroing `pushed` here made the driver wait for the next rollout call while a batch
        sat in the stream)."""
        read = len(summary.get("entry_ids", [])) + len(summary["stale"]) + summary["held"] - self.learner_held
        self.pushed, self.learner_held = max(self.pushed - read, 0), summary["held"]
        committer.owe([entry_id for entry_id, _, _ in summary["stale"]])
        self.state.bump("stale_dropped", len(summary["stale"]))
        return [group_id for _, group_id, _ in summary["stale"]]


class WorkerCounters:
    """The latest counters of every rollout worker (they come with its reports) and reward worker (with its
    receipts), and the seconds the rollout workers spent loading weights since the last step."""

    def __init__(self):
        self.rollout: dict = {}  # rollout worker id -> its latest counters
        self.reward: dict = {}  # reward worker index -> its latest counters
        self.load_seconds = 0.0

    def rollout_report(self, worker_id: str, stats: dict, load_seconds: float) -> None:
        self.rollout[worker_id] = stats
        self.load_seconds += load_seconds

    def reward_receipt(self, worker: int, stats: dict) -> None:
        self.reward[worker] = newer_counters(self.reward.get(worker), stats)

    @property
    def groups_scoring(self) -> int:
        """Groups handed to reward workers and not answered yet, as of each rollout worker's latest report."""
        return sum(stats.get("groups_scoring", 0) for stats in self.rollout.values())

    def take(self) -> tuple[dict, list[dict], float]:
        """(reward workers' counters summed, each rollout worker's counters, load seconds since the last call)."""
        load_s, self.load_seconds = self.load_seconds, 0.0
        return sum_worker_stats(self.reward.values()), list(self.rollout.values()), load_s

    def rollout_summary(self) -> dict:
        """Per rollout worker, as of its latest report: the node it runs on, its completions since it (re)started
        and the policy version it holds."""
        return {wid: {"node": s.get("node_id"), "completions": s.get("completions", 0), "version": s.get("version")}
                for wid, s in sorted(self.rollout.items())}


def newer_counters(kept: dict | None, new: dict) -> dict:
    """A reward worker's counters, the newer of two: its replies reach the driver inside rollout reports, which
    may be read in any order, so the one counting fewer groups is the older."""
    def groups(counts: dict) -> float:
        return counts.get("groups_scored", 0) + counts.get("groups_failed", 0)

    return new if kept is None or groups(new) >= groups(kept) else kept
