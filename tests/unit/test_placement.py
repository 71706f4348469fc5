from cluster.config import load_config
from cluster.placement import Placement, plan_bundles


def test_bundles_per_role():
    cfg = load_config(None, ["rollout.num_workers=3", "rollout.tensor_parallel_size=2", "learner.num_ranks=2",
                             "reward.judge.num_gpus=0.5"])
    plan = plan_bundles(cfg, needs_judge=True)
    assert plan["rollout"] == [{"GPU": 2.0, "CPU": 1.0}] * 3
    assert plan["learner"] == [{"GPU": 1.0, "CPU": 1.0}] * 2
    assert plan["judge"] == [{"GPU": 1.0, "CPU": 1.0}]  # a judge engine gets at least one whole GPU
    assert plan_bundles(cfg, needs_judge=False)["judge"] == []


def test_no_group_no_options():
    assert Placement().options("rollout", 0) == {}
