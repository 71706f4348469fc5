import pytest

from cluster.config import ConfigError, load_config
from cluster.placement import Placement, actor_options, plan_bundles, unplaceable


def test_bundles_per_role():
    cfg = load_config(None, ["rollout.num_workers=3", "rollout.tensor_parallel_size=2", "learner.num_ranks=2",
                             "reward.judge.num_gpus=0.5"])
    plan = plan_bundles(cfg, needs_judge=True)
    assert plan["rollout"] == [{"GPU": 2.0, "CPU": 1.0}] * 3
    assert plan["learner"] == [{"GPU": 1.0, "CPU": 1.0}] * 2
    assert plan["judge"] == [{"GPU": 1.0, "CPU": 1.0}]  # a judge engine gets at least one whole GPU
    assert plan["reward"] == []  # reward workers ask for nothing by default
    assert plan_bundles(cfg, needs_judge=False)["judge"] == []


def test_no_placement_section_and_no_gpus_reserves_nothing():
    cfg = load_config(None, ["rollout.num_workers=2", "learner.num_ranks=2"])
    assert cfg.placement.roles() == {}
    assert all(b == [] for b in plan_bundles(cfg, needs_judge=True, cluster_has_gpus=False).values())


def test_configured_roles_get_one_bundle_per_actor():
    cfg = load_config(None, [
        "rollout.num_workers=2", "reward.num_workers=3", "learner.num_ranks=1",
        "placement.rollout={num_cpus: 1, resources: {rollout_node: 1}}",
        "placement.reward.resources={rollout_node: 0.25}",
        "placement.learner={num_cpus: 2, resources: {learner_node: 1}}",
        "placement.judge={num_gpus: 0.5, resources: {judge_node: 1}}",
    ])
    cpu = plan_bundles(cfg, needs_judge=True, cluster_has_gpus=False)
    assert cpu["rollout"] == [{"CPU": 1.0, "rollout_node": 1.0}] * 2
    assert cpu["reward"] == [{"rollout_node": 0.25}] * 3
    assert cpu["learner"] == [{"CPU": 2.0, "learner_node": 1.0}]
    assert cpu["judge"] == [{"GPU": 0.5, "judge_node": 1.0}]  # an explicit num_gpus wins
    # num_gpus left unset keeps the GPU rule on a cluster with GPUs
    gpu = plan_bundles(cfg, needs_judge=False, cluster_has_gpus=True)
    assert gpu["rollout"] == [{"CPU": 1.0, "GPU": 1.0, "rollout_node": 1.0}] * 2
    assert gpu["learner"] == [{"CPU": 2.0, "GPU": 1.0, "learner_node": 1.0}]
    assert gpu["judge"] == []
    assert actor_options(cpu["rollout"][0]) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"rollout_node": 1.0}}


def test_no_group_no_options():
    assert Placement().options("rollout", 0) == {}


def test_a_bundle_no_node_can_hold_is_named():
    nodes = [{"CPU": 1.0, "learner_node": 1.0}, {"CPU": 2.0, "rollout_node": 1.0}]
    assert unplaceable([{"CPU": 1.0, "learner_node": 1.0}, {"CPU": 2.0, "rollout_node": 1.0}], nodes) == []
    assert unplaceable([{"CPU": 2.0, "learner_node": 1.0}, {"judge_node": 1.0}], nodes) == [
        {"CPU": 2.0, "learner_node": 1.0}, {"judge_node": 1.0}]


@pytest.mark.parametrize("override, message", [
    ("placement.trainer.num_cpus=1", "placement.trainer: unknown key; allowed keys here: judge, learner, reward, "
                                     "rollout, strategy, timeout_s"),
    ("placement.rollout.num_cpus=-1", "placement.rollout.num_cpus: Input should be greater than or equal to 0"),
    ("placement.learner.num_gpus=-0.5", "placement.learner.num_gpus"),
    ("placement.rollout.resources={rollout_node: -1}", "rollout_node: -1.0 must be > 0"),
    ("placement.rollout.resources={rollout_node: 0}", "must be > 0"),
    ("placement.rollout.resources={rollout_node: 1.5}", "fractional quantities only below 1"),
    ("placement.reward.resources={CPU: 1}", "'CPU' is Ray's own resource"),
    ("placement.judge.num_cpus=0", "placement.judge: Value error, asks for no resources"),
    ("placement.strategy=STRICT_PACK", "placement.strategy"),
    ("placement.rollout.nodes=2", "placement.rollout.nodes: unknown key"),
])
def test_a_placement_that_cannot_work_is_refused_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
