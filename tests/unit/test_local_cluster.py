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


def _recorded_cluster(folder, nodes):
    """A cluster.json as start_cluster writes it, for the checks that come before any process is touched."""
    import json

    from cluster.local_cluster import RECORD

    folder.mkdir()
    (folder / RECORD).write_text(json.dumps({
        "temp_root": str(folder / "t"), "address": "127.0.0.1:1", "dashboard_url": None, "shm_before": [],
        "nodes": [{"name": n, "spec": {}, "temp_dir": str(folder / "t" / f"n{i}"), "node_id": f"id{i}",
                   "pids": [], **extra} for i, (n, extra) in enumerate(nodes)]}))
    return folder


def test_kill_node_and_add_node_refuse_the_head_unknown_and_running_nodes(tmp_path):
    from cluster.local_cluster import add_node, kill_node

    folder = _recorded_cluster(tmp_path / "c", [("head", {}), ("rollout", {})])
    with pytest.raises(ValueError, match="the head holds the GCS"):
        kill_node(folder, "head")
    with pytest.raises(KeyError, match="no node 'gpu'"):
        kill_node(folder, "gpu")
    with pytest.raises(ValueError, match="'rollout' of .* is running"):
        add_node(folder, "rollout:rollout_node=1")
    with pytest.raises(NodeSpecError, match="not a number"):
        add_node(folder, "extra:cpus=x")
    with pytest.raises(FileNotFoundError, match="no local cluster"):
        kill_node(tmp_path / "none", "rollout")


def test_kill_node_marks_the_node_dead_so_that_it_can_join_again(tmp_path):
    import json

    from cluster.local_cluster import RECORD, kill_node

    folder = _recorded_cluster(tmp_path / "c", [("head", {}), ("rollout", {})])
    assert kill_node(folder, "rollout") == []  # no process of it runs: nothing to end
    node = json.loads((folder / RECORD).read_text())["nodes"][1]
    assert node["alive"] is False and node["pids"] == []


def test_cli_kill_node_and_add_node_refuse_with_a_message(tmp_path, capsys):
    from cluster.cli import main

    folder = _recorded_cluster(tmp_path / "c", [("head", {}), ("rollout", {})])
    assert main(["cluster", "kill-node", str(folder), "head"]) == 2
    assert "the head holds the GCS" in capsys.readouterr().err
    assert main(["cluster", "kill-node", str(folder), "gpu"]) == 2
    assert "no node 'gpu'" in capsys.readouterr().err
    assert main(["cluster", "add-node", str(folder), "rollout:rollout_node=1"]) == 2
    assert "is running (kill_node it first)" in capsys.readouterr().err
