from pathlib import Path

import pytest

from cluster.local_cluster import DEFAULT_OBJECT_STORE_MB, NodeSpec, NodeSpecError, parse_nodes


def test_node_specs_head_first_with_names_cpus_and_custom_resources():
    nodes = parse_nodes(["head:learner_node=1,cpus=1", "rollout_node=2,cpus=2,gpus=0", "judge:object_store_mb=200",
                         "idle:"])
    assert nodes == [
        NodeSpec("head", num_cpus=1, resources={"learner_node": 1.0}),
        NodeSpec("node1", num_cpus=2, num_gpus=0, resources={"rollout_node": 2.0}),
        NodeSpec("judge", object_store_mb=200),
        NodeSpec("idle"),
    ]
    assert nodes[1].object_store_mb == DEFAULT_OBJECT_STORE_MB
    assert parse_nodes(["cpus=1"])[0].name == "head"  # the first node is the head, named so by default
    assert parse_nodes(["x=0.5"])[0].resources == {"x": 0.5}


@pytest.mark.parametrize("specs, message", [
    ([], "at least one node"),
    (["cpus=1", "cpus=1", "node1:cpus=2"], "distinct"),
    (["head:cpus"], "not KEY=VALUE"),
    (["head:=1"], "not KEY=VALUE"),
    (["head:cpus=two"], "not a number"),
    (["head:cpus=1.5"], "whole number"),
    (["head:gpus=-1"], "whole number"),
    (["head:rollout_node=0"], "must be > 0"),
    (["head:rollout_node=-2"], "must be > 0"),
    (["head:CPU=2"], "Ray's own resource"),
    (["head:object_store_mb=10"], "at least 80"),
    (["he ad:cpus=1"], "name"),
])
def test_bad_node_specs_are_refused_with_the_reason(specs, message):
    with pytest.raises(NodeSpecError, match=message):
        parse_nodes(specs)


def test_cli_refuses_a_bad_node_spec_before_starting_anything(tmp_path, capsys):
    from cluster.cli import main

    assert main(["cluster", "up", "--dir", str(tmp_path / "c"), "head:cpus=x"]) == 2
    assert "cpus=x is not a number" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_auth_variables_are_always_explicit():
    from cluster.local_cluster import auth_env

    # with RAY_AUTH_MODE unset Ray 2.60 turns token auth on by itself when ~/.ray/auth_token exists
    assert auth_env(None) == {"RAY_AUTH_MODE": "disabled"}
    assert auth_env("/c/auth_token") == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/c/auth_token"}


def test_cluster_token_is_new_random_and_owner_only(tmp_path):
    from cluster.local_cluster import _write_token

    first = _write_token(tmp_path)
    text = open(first).read()
    assert first == str(tmp_path.resolve() / "auth_token") and len(text) == 64 and int(text, 16) >= 0
    assert (tmp_path / "auth_token").stat().st_mode & 0o777 == 0o600
    assert open(_write_token(tmp_path)).read() != text  # a new cluster in the same folder gets a new token


def test_start_cluster_refuses_an_unknown_auth_mode_before_starting_anything(tmp_path):
    from cluster.local_cluster import start_cluster

    with pytest.raises(ValueError, match="auth='tls'"):
        start_cluster(tmp_path / "c", ["head:cpus=1"], auth="tls")
    assert not (tmp_path / "c").exists()


def test_two_node_demo_stages_share_one_placement():
    from cluster.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    sft = load_config(configs / "demo_stage0_two_nodes.yaml")
    rl = load_config(configs / "demo_two_nodes.yaml")
    assert sft.stage == 0 and rl.stage == 2
    assert sft.placement == rl.placement and set(sft.placement.roles()) == {"rollout", "reward", "learner"}
