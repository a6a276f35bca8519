"""The `ppojax` command."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="ppojax", description="Pure-JAX PPO for RLHF of language models.")
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="run a small, real PPO-RLHF loop on the CPU in seconds")
  demo.add_argument("--iterations", type=int, default=40)
  demo.add_argument("--preset", default="ppojax", help="ppojax | trl | openrlhf | verl | openai")
  demo.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  if args.command == "demo":
    from ppojax import demo as demo_module
    from ppojax.presets import PRESETS

    if args.preset not in PRESETS:
      parser.error(f"--preset: unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    cfg = demo_module.DemoConfig(preset=args.preset)
    print(f"ppojax demo: tabular policy, vocab {cfg.vocab_size}, {cfg.response_length} tokens, preset {cfg.preset!r}")
    history = demo_module.run(cfg, iterations=args.iterations, seed=args.seed)
    first, last = history[0], history[-1]
    print(f"score {first['score']:.3f} -> {last['score']:.3f}; KL to reference {last['kl']:.3f} nats (target {cfg.kl_target})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
