"""The `ppojax` command.

  ppojax train CONFIG.yaml [key=value ...]   validate the config and data, then run its stage (sft, rm, ppo)
  ppojax generate --model DIR --prompts FILE sample responses from a local HF directory (JSON lines out)
  ppojax demo [--fast] [--output-dir DIR]   the whole RLHF pipeline on a synthetic task with a known gold reward
  ppojax eval-rm --model DIR --data FILE     reward-model accuracy, gold correlation and length bias
  ppojax review SAMPLES.jsonl                rate samples 1-5 by hand; agreement with the reward model

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
    add_aids_commands(sub)
    args, extra = parser.parse_known_args(argv)  # key=value may also follow an option such as --no-progress
    if args.command == "train":
        unknown = [x for x in extra if x.startswith("-") or "=" not in x]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    from ppojax.memory import release_compiler_memory

    release_compiler_memory()  # the compiler's freed memory back to the OS before each program runs
    if args.command == "train":
        return _train(args)
    if args.command in AIDS_COMMANDS:
        return AIDS_COMMANDS[args.command](args)
    if args.command == "generate":
        return _generate(args)
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
        if config.ignored_keys:
            print(
                f"ppojax: note: ignoring LLaMA-Factory keys with no meaning here: {', '.join(config.ignored_keys)} "
                "(ppojax.config.INERT_KEYS and DEFAULT_ONLY_KEYS say why)",
                file=sys.stderr,
            )
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


# ----------------------------------------------------------------------------------------------------------
# Practitioner aids (issue 10): eval-rm, review.


def _add_chat_flags(parser, prefix: str = "") -> None:
    """--default-system and --enable-thinking: how prompts are rendered with a chat template (config keys
    default_system and enable_thinking)."""
    parser.add_argument(
        "--default-system", help=f"{prefix}system prompt for records without one (needs a chat template)"
    )
    parser.add_argument(
        "--enable-thinking",
        choices=("true", "false"),
        help=f"{prefix}the chat template's thinking switch (Qwen3: false renders the empty think block, no reasoning)",
    )


def _thinking(args) -> bool | None:
    return None if args.enable_thinking is None else args.enable_thinking == "true"


def add_aids_commands(sub) -> None:
    evaluate = sub.add_parser(
        "eval-rm", help="reward-model accuracy on held-out pairs, correlation with gold scores, length bias"
    )
    evaluate.add_argument("--model", required=True, help="reward-model directory (a stage: rm output_dir)")
    evaluate.add_argument(
        "--data",
        required=True,
        help="held-out .json / .jsonl: pairs, or responses with gold scores; or LLaMA-Factory dataset names",
    )
    evaluate.add_argument(
        "--dataset-dir", help="where --data names are looked up in dataset_info.json (LLaMA-Factory's; default data)"
    )
    evaluate.add_argument("--template", default="default", help="chat template as in training (default: raw text)")
    _add_chat_flags(evaluate, "as in training: ")
    evaluate.add_argument("--cutoff-len", type=int, default=2048, help="maximum tokens of prompt + response")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--threshold", type=float, default=0.6, help="gold correlation below it: retrain")
    evaluate.add_argument("--length-bias-threshold", type=float, default=0.5, help="score-length Spearman flagged")
    evaluate.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    evaluate.add_argument(
        "--base", help="for a LLaMA-Factory LoRA reward model: the model its adapter was trained on (a local HF dir)"
    )
    evaluate.add_argument("--json", metavar="FILE", help="also write the numbers to FILE (JSON)")
    _add_review_command(sub)


def _eval_rm(args) -> int:
    import json
    import os

    from ppojax.config import ConfigError
    from ppojax.models import CheckpointError

    try:
        from ppojax import dataset_info

        if not os.path.isdir(args.model):
            raise ConfigError(f"--model {args.model}: no such directory")
        named = not os.path.isfile(args.data) and os.path.isfile(dataset_info.info_path(args.dataset_dir))
        if not os.path.isfile(args.data) and not named:
            raise ConfigError(f"--data {args.data}: no such file (nor a dataset_info.json to look it up in)")
        if args.batch_size < 1 or args.cutoff_len < 2:
            raise ConfigError(
                f"--batch-size must be >= 1 and --cutoff-len >= 2, got {args.batch_size}, {args.cutoff_len}"
            )
        from ppojax import eval_rm

        result = eval_rm.evaluate_reward_model(
            os.path.abspath(args.model),
            args.data if named else os.path.abspath(args.data),
            template=args.template,
            default_system=args.default_system,
            enable_thinking=_thinking(args),
            cutoff_len=args.cutoff_len,
            batch_size=args.batch_size,
            threshold=args.threshold,
            length_bias_threshold=args.length_bias_threshold,
            bf16=args.bf16,
            base=os.path.abspath(args.base) if args.base else None,
            dataset_dir=args.dataset_dir,
        )
    except (ConfigError, CheckpointError) as e:
        print(f"ppojax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(eval_rm.format_report(result))
    if args.json:
        from ppojax.reports import atomic_write

        atomic_write(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _add_review_command(sub) -> None:
    review = sub.add_parser("review", help="rate samples 1-5 by hand (resumable); agreement with the reward model")
    review.add_argument("samples", help="samples.jsonl (prompt, response, score), e.g. <output_dir>/ppo_metrics/")
    review.add_argument("--ratings", help="ratings file (default: <samples>.ratings.jsonl beside it)")
    review.add_argument("--high-score", type=float, help="reward-model score counted as high (default: 75th pct)")
    review.add_argument("--max-chars", type=int, default=4000, help="longest prompt / response text shown")


def _review(args) -> int:
    import os

    from ppojax.config import ConfigError
    from ppojax.review import ReviewError, review

    try:
        if not os.path.isfile(args.samples):
            raise ConfigError(f"{args.samples}: no such file (expected samples.jsonl from a ppo run)")
        result = review(args.samples, ratings_path=args.ratings, high_score=args.high_score, max_chars=args.max_chars)
    except (ConfigError, ReviewError) as e:
        print(f"ppojax: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 130 if result["stopped"] == "interrupted" else 0


AIDS_COMMANDS = {"eval-rm": _eval_rm, "review": _review}


# ---- ppojax generate ------------------------------------------------------------------------------------


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="sample responses to a prompts file from a local HF model directory")
    gen.add_argument("--model", required=True, help="local Hugging Face directory (e.g. a ppo output_dir)")
    gen.add_argument(
        "--prompts",
        required=True,
        help="JSON / JSONL prompts (instruction/input, prompt or messages), or LLaMA-Factory dataset names",
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 is off")
    gen.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty (> 0; 1 is off)"
    )
    gen.add_argument("--template", default="none", help="none (raw text) or a name: the tokenizer's chat template")
    _add_chat_flags(gen)
    gen.add_argument(
        "--dataset-dir", help="where --prompts names are looked up in dataset_info.json (LLaMA-Factory's; default data)"
    )
    gen.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their last tokens")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute")
    gen.add_argument("--output", help="write the JSON lines here instead of stdout")
    gen.add_argument(
        "--mesh",
        help="sample on a device mesh, e.g. '{data: 4, tensor: 2}' (as the train config's mesh key; batch size a "
        "multiple of data x fsdp)",
    )


def _generate(args) -> int:
    import json

    from ppojax.config import ConfigError
    from ppojax.models import CheckpointError
    from ppojax.reports import atomic_write
    from ppojax.runner_generate import generate

    try:
        mesh = None
        if args.mesh is not None:
            import yaml

            try:
                mesh = yaml.safe_load(args.mesh)
            except yaml.YAMLError:
                mesh = args.mesh
            if not isinstance(mesh, dict):
                raise ConfigError(f"command line: '--mesh' is {args.mesh!r}; must be a mapping like '{{data: 2}}'")
        rows = generate(
            args.model,
            args.prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            template=args.template,
            default_system=args.default_system,
            enable_thinking=_thinking(args),
            dataset_dir=args.dataset_dir,
            max_prompt_length=args.max_prompt_length,
            batch_size=args.batch_size,
            seed=args.seed,
            bf16=args.bf16,
            mesh=mesh,
        )
        from ppojax import parallel

        if not parallel.is_primary():  # a multi-host run: every process samples, process 0 writes
            for _ in rows:
                pass
        elif args.output:
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
