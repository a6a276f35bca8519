"""The `ppojax` command.

  ppojax train CONFIG.yaml [key=value ...]   validate the config and data, then run its stage (sft, rm, ppo)
  ppojax generate --model DIR --prompts FILE sample responses from a local HF directory (JSON lines out)
  ppojax demo [--iterations N] [--preset P]  a small, real PPO-RLHF loop on the CPU in seconds

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
    _add_generate_parser(sub)
    demo = sub.add_parser("demo", help="run a small, real PPO-RLHF loop on the CPU in seconds")
    demo.add_argument("--iterations", type=int, default=40)
    demo.add_argument("--preset", default="ppojax", help="ppojax | trl | openrlhf | verl | openai")
    demo.add_argument("--seed", type=int, default=0)
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
    if args.command == "generate":
        return _generate(args)
    if args.command == "demo":
        from ppojax import demo as demo_module
        from ppojax.presets import PRESETS

        if args.preset not in PRESETS:
            parser.error(f"--preset: unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
        cfg = demo_module.DemoConfig(preset=args.preset)
        print(
            f"ppojax demo: tabular policy, vocab {cfg.vocab_size}, {cfg.response_length} tokens, preset {cfg.preset!r}"
        )
        history = demo_module.run(cfg, iterations=args.iterations, seed=args.seed)
        first, last = history[0], history[-1]
        print(
            f"score {first['score']:.3f} -> {last['score']:.3f}; KL to reference {last['kl']:.3f} nats (target {cfg.kl_target})"
        )
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


# ---- ppojax generate ------------------------------------------------------------------------------------


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample responses to a prompts file from a local HF model directory")
    gen.add_argument("--model", required=True, help="local Hugging Face directory (e.g. a ppo output_dir)")
    gen.add_argument("--prompts", required=True, help="JSON / JSONL prompts (instruction/input, prompt or messages)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 is off")
    gen.add_argument("--template", default="none", help="none (raw text) or a name: the tokenizer's chat template")
    gen.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their last tokens")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    gen.add_argument("--output", help="write the JSON lines here instead of stdout")


def _generate(args) -> int:
    import json

    from ppojax.config import ConfigError
    from ppojax.models import CheckpointError
    from ppojax.reports import atomic_write
    from ppojax.runner_generate import generate

    try:
        rows = generate(
            args.model,
            args.prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            template=args.template,
            max_prompt_length=args.max_prompt_length,
            batch_size=args.batch_size,
            seed=args.seed,
            bf16=args.bf16,
        )
        if args.output:
            atomic_write(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        else:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False), flush=True)
    except (ConfigError, CheckpointError) as e:
        print(f"ppojax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
