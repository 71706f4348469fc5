"""GPU placement on a cluster: one placement group with a bundle per rollout engine (tensor_parallel_size
GPUs), per learner rank (1 GPU) and for a local judge, so the job starts whole or waits instead of
half-starting. On machines without GPUs (the embedded CPU default) nothing is reserved."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import JobConfig


def plan_bundles(cfg: JobConfig, needs_judge: bool) -> dict[str, list[dict]]:
    """Bundles by role: rollout, learner, judge (each a list, in the order the actors are created)."""
    plan = {
        "rollout": [{"GPU": float(cfg.rollout.tensor_parallel_size), "CPU": 1.0}] * cfg.rollout.num_workers,
        "learner": [{"GPU": 1.0, "CPU": 1.0}] * cfg.learner.num_ranks,
        "judge": [],
    }
    if needs_judge:
        plan["judge"] = [{"GPU": max(float(cfg.reward.judge.num_gpus), 1.0), "CPU": 1.0}]
    return plan


@dataclass
class Placement:
    group: object | None = None
    index: dict[str, list[int]] = field(default_factory=dict)

    def options(self, role: str, i: int) -> dict:
        """Ray actor options placing the i-th actor of `role` on its bundle (empty without a group)."""
        if self.group is None:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self.index[role][i]
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle)}


def reserve(cfg: JobConfig, needs_judge: bool, timeout_s: float = 600.0) -> Placement:
    import ray
    from ray.util.placement_group import placement_group

    if ray.cluster_resources().get("GPU", 0) < 1:
        return Placement()
    plan = plan_bundles(cfg, needs_judge)
    bundles, index = [], {}
    for role, role_bundles in plan.items():
        index[role] = list(range(len(bundles), len(bundles) + len(role_bundles)))
        bundles += role_bundles
    group = placement_group(bundles, strategy="PACK", name=f"avatar-{cfg.name}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the cluster could not place {len(bundles)} bundles ({bundles}) within {timeout_s:.0f} s: "
                           f"{ray.cluster_resources()} available") from None
    return Placement(group=group, index=index)
