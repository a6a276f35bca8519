"""The `ppojax` command.

  ppojax train CONFIG.yaml [key=value ...]   validate the config and data, then run its stage (sft, rm, ppo)
  ppojax demo [--fast] [--output-dir DIR]     the whole RLHF pipeline on a synthetic task with a known gold reward

A bad config, data file or checkpoint is reported as one line on stderr (no traceback) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

EXIT_BAD_INPUT = 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ppojax", description="Pure-JAX PPO for RLHF of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a stage (sft, rm, ppo) from a LLaMA-Factory-style YAML config")
    train.add_argument("config", help="YAML file of key: value settings (see ppojax/config.py for every key)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a key; the value is read as YAML")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo = sub.add_parser("demo", help="the whole RLHF pipeline (data, sft, rm, ppo, evaluation) on a synthetic task")
    demo.add_argument("--output-dir", default="ppojax_demo", help="where every stage writes (default ./ppojax_demo)")
    demo.add_argument("--fast", action="store_true", help="tiny sizes: a smoke test in about a minute")
    demo.add_argument("--iterations", type=int, default=None, help="PPO iterations (default: the demo's)")
    demo.add_argument("--kl-coef", type=float, default=None, help="fixed KL coefficient β")
    demo.add_argument(
        "--length-bias", type=float, default=None, help="bias the preference labels toward longer responses"
    )
    demo.add_argument("--preset", default="ppojax", help="PPO convention: ppojax | trl | openrlhf | verl | openai")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--reuse",
        action="store_true",
        help="keep the data, sft and rm stages of an earlier run in --output-dir made with the same settings",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, extra = parser.parse_known_args(argv)  # key=value may also follow an option such as --no-progress
    if args.command == "train":
        unknown = [x for x in extra if x.startswith("-") or "=" not in x]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "train":
        return _train(args)
    if args.command == "demo":
        return _demo(args, parser)
    return 0


def _demo(args, parser) -> int:
    from ppojax import demo as demo_module
    from ppojax.presets import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    cfg = (demo_module.FAST if args.fast else demo_module.DemoConfig()).replace(seed=args.seed, preset=args.preset)
    changes = {"ppo_iterations": args.iterations, "kl_coef": args.kl_coef, "length_bias": args.length_bias}
    cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
    demo_module.run(args.output_dir, cfg, progress=not args.no_progress, reuse=args.reuse)
    return 0


def _train(args) -> int:
    from ppojax.config import ConfigError, load_config
    from ppojax.models import CheckpointError

    try:
        config = load_config(args.config, args.overrides)
        from ppojax import runner

        summary = runner.run(config, progress=not args.no_progress)
    except (ConfigError, CheckpointError) as e:
        print(f"ppojax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"ppojax {config.stage}: {summary['status']}; model saved to {config.output_dir}; "
        f"reports in {config.output_dir}/{config.stage}_metrics"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
