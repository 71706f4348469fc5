"""Placement of the job's actors: one placement group with a bundle per actor that needs resources, so the job
starts whole or waits instead of half-starting.

Without a `placement` section: on a cluster with GPUs a bundle per rollout engine (tensor_parallel_size GPUs), per
learner rank (1 GPU) and for a local judge; without GPUs (the embedded CPU default) nothing is reserved and every
actor asks for nothing. With it, each configured role gets a bundle per actor holding what the section asks for
(custom resources such as {"rollout_node": 1} put the role on the nodes started with them); the roles left out
keep the rule above. An actor asks for exactly its bundle."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import JobConfig, RoleResources


def role_counts(cfg: JobConfig, needs_judge: bool) -> dict[str, int]:
    """Actors per role, in the order they are created."""
    return {"rollout": cfg.rollout.num_workers, "learner": cfg.learner.num_ranks, "judge": int(needs_judge),
            "reward": cfg.reward.num_workers}


def _gpus(cfg: JobConfig, role: str) -> float:
    """GPUs per actor of a role on a cluster with GPUs (the rule without a placement section)."""
    return {"rollout": float(cfg.rollout.tensor_parallel_size), "learner": 1.0,
            "judge": max(float(cfg.reward.judge.num_gpus), 1.0), "reward": 0.0}[role]


def _bundle(asked: RoleResources, gpus: float) -> dict:
    bundle = {"CPU": float(asked.num_cpus), "GPU": float(asked.num_gpus if asked.num_gpus is not None else gpus),
              **{k: float(v) for k, v in asked.resources.items()}}
    return {k: v for k, v in bundle.items() if v}


def plan_bundles(cfg: JobConfig, needs_judge: bool, cluster_has_gpus: bool = True) -> dict[str, list[dict]]:
    """Bundles by role: rollout, learner, judge, reward (each a list, in the order the actors are created;
    empty for a role whose actors ask for nothing)."""
    plan = {}
    for role, n in role_counts(cfg, needs_judge).items():
        gpus = _gpus(cfg, role) if cluster_has_gpus else 0.0
        asked = getattr(cfg.placement, role)
        if asked is not None:
            bundle = _bundle(asked, gpus)
        else:
            bundle = {"GPU": gpus, "CPU": 1.0} if gpus else {}
        plan[role] = [bundle] * n if bundle else []
    return plan


def actor_options(bundle: dict) -> dict:
    """The Ray actor options asking for exactly `bundle`."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0), "resources": custom}


@dataclass
class Placement:
    group: object | None = None
    bundles: dict[str, list[dict]] = field(default_factory=dict)  # by role, as plan_bundles
    index: dict[str, list[int]] = field(default_factory=dict)  # by role: each actor's bundle in the group

    def options(self, role: str, i: int) -> dict:
        """Ray actor options placing the i-th actor of `role` on its bundle and asking for what the bundle holds
        (empty when the role has no bundle: the actor asks for what its class says, nothing on a CPU job)."""
        if self.group is None or not self.index.get(role):
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {**actor_options(self.bundles[role][i]),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=self.index[role][i])}


def unplaceable(bundles: list[dict], nodes: list[dict]) -> list[dict]:
    """The bundles that no single node could hold even when empty (`nodes`: each alive node's total resources):
    waiting for them would only time out."""
    return [b for b in bundles if not any(all(node.get(k, 0.0) >= v for k, v in b.items()) for node in nodes)]


def reserve(cfg: JobConfig, needs_judge: bool) -> Placement:
    import ray
    from ray.util.placement_group import placement_group

    has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
    if not has_gpus and not cfg.placement.roles():
        return Placement()  # today's CPU default: nothing reserved
    plan = plan_bundles(cfg, needs_judge, has_gpus)
    bundles, index = [], {}
    for role, role_bundles in plan.items():
        index[role] = list(range(len(bundles), len(bundles) + len(role_bundles)))
        bundles += role_bundles
    if not bundles:
        return Placement()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    missing = unplaceable(bundles, nodes)
    if missing:
        raise RuntimeError(f"placement: no node of the cluster can hold {missing}; the nodes have {nodes} "
                           "(start nodes with those resources, e.g. ray start --resources='{\"rollout_node\": 1}', "
                           "or change the placement section)")
    strategy = cfg.placement.strategy if cfg.placement.roles() else "PACK"
    group = placement_group(bundles, strategy=strategy, name=f"avatar-{cfg.name}")
    timeout_s = cfg.placement.timeout_s
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
        raise RuntimeError(f"the cluster could not place {len(bundles)} bundles ({bundles}) within {timeout_s:.0f} s: "
                           f"{ray.available_resources()} available") from None
    return Placement(group=group, bundles=plan, index=index)
