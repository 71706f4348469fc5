"""Command line: `python -m cluster.cli <command> ...`.

  train CONFIG [key=value ...]          one stage (0 = SFT, 1-3 = RL); resumes from the run's last checkpoint
  curriculum CONFIG [CONFIG ...]        stages in sequence, each from the previous stage's exported policy
  demo [CONFIG]                         the CPU demo: stage-0 SFT, then a short AVATAR stage (make run)
  eval CONFIG [key=value ...]           greedy accuracy of the config's model (or init_from) on the eval split
  smoke CONFIG [key=value ...]          build the tiny model and data, one forward/backward and generate
  report RUN_DIR                        PNG plots from a run's history
  buffer inspect --url URL --password P replay tiers, ages, rewards, advantages, streaks
  data synth OUT_DIR [num_items=N ...]  write the synthetic audio-visual dataset
  config CONFIG [key=value ...]         print the resolved config
  cluster up [--dir DIR] [--dashboard] [--auth token|disabled] NODE [NODE ...]
                                        a Ray cluster of several nodes on 127.0.0.1 (the first is the head);
                                        NODE is [NAME:]KEY=VALUE,... with keys cpus, gpus, object_store_mb and
                                        custom resources, e.g. head:learner_node=1,cpus=1 rollout_node=1,cpus=1;
                                        Ray's token authentication on (a token in DIR/auth_token) unless
                                        --auth disabled
  cluster down DIR                      stop that cluster by PID
  cluster kill-node DIR NAME            SIGKILL one worker node's processes (a node lost)
  cluster add-node DIR NODE             start a worker node that joins it (again)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.console import configure_console

from .config import ConfigError, dump_config, load_config


def _configs_with_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    files = [x for x in items if "=" not in x]
    overrides = [x for x in items if "=" in x]
    return files, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "smoke", "config", "eval"):
        p = sub.add_parser(name)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        if name == "train":
            p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this run")
    for name in ("curriculum", "demo"):
        p = sub.add_parser(name)
        p.add_argument("items", nargs="*", help="config files, then key.sub=value overrides for every stage")
        p.add_argument("--fresh", action="store_true")
    rep = sub.add_parser("report")
    rep.add_argument("run_dir")
    buf = sub.add_parser("buffer").add_subparsers(dest="buffer_command", required=True)
    ins = buf.add_parser("inspect", add_help=False)
    ins.add_argument("rest", nargs=argparse.REMAINDER)
    data = sub.add_parser("data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth")
    synth.add_argument("out_dir")
    synth.add_argument("overrides", nargs="*", help="synth settings, e.g. num_items=100 stage=2")
    clu = sub.add_parser("cluster").add_subparsers(dest="cluster_command", required=True)
    up = clu.add_parser("up")
    up.add_argument("nodes", nargs="+", help="[NAME:]KEY=VALUE,... one per node, the head first")
    up.add_argument("--dir", default="runs/local-cluster", help="where its PIDs and logs are kept")
    up.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (about 1.3 GB; needed by "
                    "ray job submit)")
    up.add_argument("--auth", choices=("token", "disabled"), default="token",
                    help="Ray's token authentication (default: on, with a token made for this cluster in "
                    "DIR/auth_token, mode 0600)")
    down = clu.add_parser("down")
    down.add_argument("dir")
    kill = clu.add_parser("kill-node", help="SIGKILL a worker node's raylet and all its processes, by PID")
    kill.add_argument("dir")
    kill.add_argument("name")
    add = clu.add_parser("add-node", help="start a worker node that joins the cluster (again, after kill-node)")
    add.add_argument("dir")
    add.add_argument("node", help="[NAME:]KEY=VALUE,...")
    args = parser.parse_args(argv)
    configure_console()

    try:
        if args.command == "config":
            print(dump_config(load_config(args.config, args.overrides)), end="")
        elif args.command == "train":
            from .job import run_stage

            summary = run_stage(load_config(args.config, args.overrides), resume=not args.fresh)
            _print_summary([summary])
        elif args.command in ("curriculum", "demo"):
            from .job import run_curriculum

            files, overrides = _configs_with_overrides(args.items)
            if args.command == "demo" and not files:
                files = ["configs/demo_stage0.yaml", "configs/demo.yaml"]
            if not files:
                raise ConfigError("curriculum: give one config file per stage")
            # a later stage starts from the previous stage's export (set by run_curriculum, checked by run_stage)
            stages = [load_config(f, overrides, unchecked_paths=("init_from",) if i else ()) for i, f in enumerate(files)]
            summaries = run_curriculum(stages, resume=not args.fresh)
            _print_summary(summaries)
        elif args.command == "eval":
            from .job import run_eval

            print(run_eval(load_config(args.config, args.overrides)))
        elif args.command == "smoke":
            from .smoke import run_smoke

            cfg = load_config(args.config, args.overrides)
            run_dir = Path(cfg.run_dir) / cfg.name
            run_dir.mkdir(parents=True, exist_ok=True)
            run_smoke(cfg, run_dir)
        elif args.command == "report":
            from .report import write_report

            for path in write_report(args.run_dir):
                print(f"[report] wrote {path}")
        elif args.command == "buffer":
            from buffer_service.inspect import main as inspect_main

            return inspect_main(args.rest) or 0
        elif args.command == "cluster":
            return _cluster_command(args)
        elif args.command == "data":
            from data.synth import generate

            cfg = load_config(None, [f"data.synth.{o}" for o in args.overrides])
            print(f"[synth] wrote {generate(cfg.data.synth, args.out_dir, progress=True)}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .job import JobInterrupted

        if not isinstance(exc, JobInterrupted):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


def _cluster_command(args) -> int:
    from .local_cluster import NodeSpecError, add_node, kill_node, start_cluster, stop_cluster

    if args.cluster_command == "down":
        pids = stop_cluster(args.dir)
        print(f"[cluster] stopped {len(pids)} processes of {args.dir}")
        return 0
    if args.cluster_command == "kill-node":
        try:
            pids = kill_node(args.dir, args.name)
        except (KeyError, ValueError, FileNotFoundError) as exc:  # the head, an unknown node, no cluster
            print(f"error: {str(exc).strip(chr(39))}", file=sys.stderr)
            return 2
        print(f"[cluster] killed node {args.name}: {len(pids)} processes")
        return 0
    if args.cluster_command == "add-node":
        try:
            node = add_node(args.dir, args.node)
        except (ValueError, FileNotFoundError) as exc:  # a bad spec (NodeSpecError), a node still running
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"[cluster] {node['name']} joined as node {node['node_id']} ({len(node['pids'])} processes, temp "
              f"{node['temp_dir']})")
        return 0
    try:
        cluster = start_cluster(args.dir, args.nodes, dashboard=args.dashboard, auth=args.auth)
    except NodeSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for node in cluster.nodes:
        spec = node["spec"]
        print(f"[cluster] {node['name']:<8} node {node['node_id']}  cpus={spec['num_cpus']} gpus={spec['num_gpus']} "
              f"resources={spec['resources']}  {len(node['pids'])} processes  temp {node['temp_dir']}")
    print("export " + " ".join(f"{k}={v}" for k, v in cluster.client_env().items()))
    if cluster.dashboard_url:
        print(f"dashboard and job submission: {cluster.dashboard_url} "
              f"(ray job submit --address {cluster.dashboard_url} ...)")
    print(f"stop it with: python -m cluster.cli cluster down {args.dir}")
    return 0


def _print_summary(summaries: list[dict]) -> None:
    from .report import format_mechanisms

    print("\n=== done ===")
    for s in summaries:
        before = (s.get("before") or {}).get("accuracy")
        after = (s.get("after") or {}).get("accuracy")
        print(f"stage {s['stage']}: {s['steps']} steps, {s['completions_generated']} completions generated; "
              f"eval accuracy {before:.3f} -> {after:.3f}" if before is not None and after is not None
              else f"stage {s['stage']}: {s['steps']} steps")
        run = Path(s["run_dir"])
        print(f"  checkpoints: {run / 'checkpoints'}   exported policy: {s['export']}")
        print(f"  metrics: {run / 'history.jsonl'} (per step), {run / 'prometheus.yml'} (scrape config)")
        if s.get("mechanisms"):
            print(f"  mechanisms: {format_mechanisms(s['mechanisms'])}")
        for png in s.get("report", []):
            print(f"  plot: {png}")
    first, last = summaries[0].get("before") or {}, summaries[-1].get("after") or {}
    if first.get("accuracy") is not None and last.get("accuracy") is not None:
        print(f"accuracy before training {first['accuracy']:.3f} -> after {last['accuracy']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
