"""Command line: `python -m cluster.cli <command> ...`.

  demo CONFIG [overrides]     the CPU demo (embedded Ray + Redis, tiny model, synthetic data)
  smoke CONFIG [overrides]    build the tiny model and data, one forward/backward and generate
  data synth OUT_DIR [...]    write the synthetic audio-visual dataset
  config CONFIG [overrides]   print the resolved config
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, dump_config, load_config


def _job(args):
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("demo", "smoke", "config"):
        p = sub.add_parser(name)
        p.add_argument("config", nargs="?", default=None)
        p.add_argument("overrides", nargs="*", help="key.sub=value")
    data = sub.add_parser("data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth")
    synth.add_argument("out_dir")
    synth.add_argument("overrides", nargs="*", help="synth settings, e.g. num_items=100 stage=2")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the Omni config warns about talker ids we never use

    try:
        if args.command == "config":
            cfg = load_config(args.config, args.overrides)
            print(dump_config(cfg), end="")
        elif args.command in ("smoke", "demo"):
            from .smoke import run_smoke

            cfg, run_dir = _job(args)
            run_smoke(cfg, run_dir)
        elif args.command == "data":
            from data.synth import generate

            cfg = load_config(None, [f"data.synth.{o}" for o in args.overrides])
            print(f"[synth] wrote {generate(cfg.data.synth, args.out_dir, progress=True)}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
