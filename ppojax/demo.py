"""`ppojax demo`: the whole RLHF pipeline on a synthetic task whose true reward is known, on a laptop CPU.

    1. data      review corpus, prompts and a word-level tokenizer (`ppojax.synthetic`), a random Qwen2-shaped model
    2. sft       `ppojax train` stage sft from scratch on the corpus                       -> <out>/sft
    3. pairs     two SFT samples per prompt, labelled by noisy Bradley-Terry on the gold reward (optionally
                 biased toward the longer response)                                          -> <out>/data/pairs*.jsonl
    4. rm        `ppojax train` stage rm from the SFT model; held-out accuracy and correlation with gold -> <out>/rm
    5. ppo       PPO from SFT against the RM, critic from the RM, gold and hacking diagnostics logged -> <out>/ppo
    6. evaluate  gold, proxy, KL to the reference, length, repetition, samples: SFT vs PPO  -> <out>/report.json,
                 <out>/demo.png

Every stage writes a Hugging Face directory and the CLI's reports (`<stage>_metrics/`). The proxy reward is the
RM's score normalised to mean 0 and std 1 over the SFT model's samples (`fit_reward_normalisation`), the
score PPO optimises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppojax import diagnostics
from ppojax.generation import pad_prompts, response_logprobs, rollout, sequence_reward
from ppojax.kl import sequence_kl
from ppojax.models import DecoderModel, ModelConfig, init_params, load_pretrained, save_pretrained
from ppojax.reports import atomic_write
from ppojax.synthetic import reviews
from ppojax.synthetic.tokenizer import train_tokenizer

PROMPT_BUCKET = 8  # every opening has at most 7 words: one compiled prompt width


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the demo. `FAST` is the few-second version used by the tests."""

    seed: int = 0
    # data
    corpus_size: int = 6000
    train_prompts: int = 2048
    eval_prompts: int = 256
    pair_prompts: int = 2048
    heldout_pairs: int = 256
    label_scale: float = 0.25  # Bradley-Terry: P(a > b) = σ((gold_a − gold_b) / label_scale + length_bias · Δlen)
    length_bias: float = 0.0  # > 0 prefers longer responses (length hacking)
    # model (Qwen2-shaped)
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    # sft
    sft_steps: int = 400
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # rm
    rm_steps: int = 300
    rm_batch: int = 64
    rm_lr: float = 1e-3
    # ppo
    ppo_iterations: int = 30
    ppo_batch: int = 64
    ppo_minibatch: int = 16
    ppo_epochs: int = 4
    policy_lr: float = 2e-4
    critic_lr: float = 3e-4
    kl_coef: float = 0.1
    kl_target: float = 6.0  # nats per sequence: the evaluated KL of the final policy must stay under it
    preset: str = "ppojax"
    score_norm: bool = True  # normalise the RM's score on the SFT model's samples before PPO (ppo_score_norm)
    max_new_tokens: int = 24
    eval_batch: int = 256

    def replace(self, **changes) -> DemoConfig:
        return dataclasses.replace(self, **changes)


FAST = DemoConfig(
    corpus_size=512,
    train_prompts=256,
    eval_prompts=64,
    pair_prompts=256,
    heldout_pairs=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    sft_steps=30,
    sft_batch=32,
    rm_steps=20,
    rm_batch=32,
    ppo_iterations=4,
    ppo_batch=32,
    ppo_minibatch=16,
    ppo_epochs=1,
    max_new_tokens=16,
    eval_batch=64,
    score_norm=False,  # one compiled program fewer
)


# ----------------------------------------------------------------------------------------------------------
# The task on disk


def _write_jsonl(path: str, rows) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _task_paths(out: str) -> dict:
    data = os.path.join(out, "data")
    return {
        "sft": os.path.join(data, "sft.jsonl"),
        "prompts": os.path.join(data, "prompts.jsonl"),
        "eval_prompts": os.path.join(data, "eval_prompts.jsonl"),
        "init": os.path.join(out, "init"),
    }


def write_task(out: str, cfg: DemoConfig) -> dict:
    """Corpus (sft.jsonl), prompts (prompts.jsonl, eval_prompts.jsonl), tokenizer and a random-init model.
    Returns the paths."""
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    corpus = reviews.make_corpus(cfg.seed, cfg.corpus_size)
    tokenizer = train_tokenizer(f"{r.prompt} {r.response}" for r in corpus)
    paths = _task_paths(out)
    _write_jsonl(paths["sft"], ({"prompt": r.prompt, "response": r.response} for r in corpus))
    _write_jsonl(paths["prompts"], ({"prompt": p} for p in reviews.make_prompts(cfg.seed + 1, cfg.train_prompts)))
    _write_jsonl(paths["eval_prompts"], ({"prompt": p} for p in reviews.make_prompts(cfg.seed + 2, cfg.eval_prompts)))
    model = DecoderModel(model_config(cfg, tokenizer))
    save_pretrained(paths["init"], model, init_params(model, jax.random.PRNGKey(cfg.seed)), tokenizer)
    return paths


def model_config(cfg: DemoConfig, tokenizer) -> ModelConfig:
    """A tiny Qwen2 (q/k/v biases, RMSNorm, SwiGLU, rope, tied embeddings) over the tokenizer's vocabulary."""
    return ModelConfig(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=64,
        qkv_bias=True,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=(tokenizer.eos_token_id,),
    )


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Sampling and scoring (one compiled program per batch shape)


class Vocabulary:
    """Text <-> id batches with the task's tokenizer, and the gold reward of id batches."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return pad_prompts(ids, self.pad_id, bucket=PROMPT_BUCKET)

    def texts(self, ids: np.ndarray, mask: np.ndarray) -> list[str]:
        """Rows of ids (masked positions and EOS dropped) as text."""
        return [
            self.tokenizer.decode([int(t) for t, m in zip(row, row_mask) if m and t != self.eos_id])
            for row, row_mask in zip(np.asarray(ids), np.asarray(mask))
        ]

    def gold(self, prompt_ids, prompt_mask, response_ids, response_mask) -> np.ndarray:
        """[B] gold rewards; a response ends when its last real token is EOS."""
        response_ids, response_mask = np.asarray(response_ids), np.asarray(response_mask)
        lengths = response_mask.sum(1)
        ended = [n > 0 and row[n - 1] == self.eos_id for row, n in zip(response_ids, lengths)]
        return reviews.gold_rewards(self.texts(prompt_ids, prompt_mask), self.texts(response_ids, response_mask), ended)


@functools.partial(jax.jit, static_argnames=("policy", "reward", "max_new_tokens"))
def _sample_and_score(
    policy,
    policy_params,
    ref_params,
    reward,
    reward_params,
    prompt_ids,
    prompt_mask,
    key,
    eos_id,
    pad_id,
    *,
    max_new_tokens,
):
    """Samples at temperature 1 and returns (rollout, proxy scores [B], KL to the reference [B] (k1 summed),
    policy entropy of the sampled tokens [B] (−Σ log p))."""
    out = rollout(
        policy,
        policy_params,
        prompt_ids,
        prompt_mask,
        key,
        max_new_tokens=max_new_tokens,
        stop_token_ids=eos_id[None],
        pad_token_id=pad_id,
    )
    batch = (prompt_ids, prompt_mask, out.response_ids, out.response_mask)
    logprobs = response_logprobs(policy, policy_params, *batch, 1.0)
    ref_logprobs = response_logprobs(policy, ref_params, *batch, 1.0)
    proxy = None if reward is None else sequence_reward(reward, reward_params, *batch)
    mask = out.response_mask > 0
    return out, proxy, sequence_kl(logprobs - ref_logprobs, mask), -jnp.sum(jnp.where(mask, logprobs, 0.0), 1)


def sample_responses(vocab, policy, params, prompts, key, *, cfg, ref_params=None, reward=None, reward_params=None):
    """Samples one response per prompt text, in batches of `cfg.eval_batch` (the last one padded by repeats).
    Returns a dict of numpy arrays: prompt/response ids and masks, proxy (raw RM score), kl, nll."""
    ids, mask = vocab.encode(prompts)
    n, size = len(prompts), cfg.eval_batch
    chunks = []
    for start in range(0, n, size):
        rows = np.arange(start, start + size) % n
        key, sub = jax.random.split(key)
        out, proxy, kl, nll = _sample_and_score(
            policy,
            params,
            params if ref_params is None else ref_params,
            reward,
            reward_params,
            jnp.asarray(ids[rows]),
            jnp.asarray(mask[rows]),
            sub,
            jnp.int32(vocab.eos_id),
            jnp.int32(vocab.pad_id),
            max_new_tokens=cfg.max_new_tokens,
        )
        keep = min(size, n - start)
        chunks.append(
            jax.tree.map(
                lambda x, keep=keep: np.asarray(x)[:keep],
                {
                    "prompt_ids": ids[rows],
                    "prompt_mask": mask[rows],
                    "response_ids": out.response_ids,
                    "response_mask": out.response_mask,
                    "kl": kl,
                    "nll": nll,
                    **({} if proxy is None else {"proxy": proxy}),
                },
            )
        )
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# ----------------------------------------------------------------------------------------------------------
# Stages


def stage_config(stage: str, out: str, cfg: DemoConfig) -> dict:
    """The `ppojax train` config (key: value) of stage sft, rm or ppo of a demo run in `out` (paths relative to
    `out` when it is relative): full fine-tuning, raw template. The demo writes them to <out>/configs/*.yaml;
    `ppojax train <out>/configs/ppo.yaml kl_coef=0.1 output_dir=...` reruns a stage by hand."""
    path = functools.partial(os.path.join, out)
    common = {
        "stage": stage,
        "finetuning_type": "full",
        "template": "none",
        "overwrite_output_dir": True,
        "seed": cfg.seed,
    }
    if stage == "ppo":
        return {
            **common,
            "model_name_or_path": path("sft"),
            "reward_model": path("rm"),
            "dataset": path("data", "prompts.jsonl"),
            "output_dir": path("ppo"),
            "max_prompt_length": PROMPT_BUCKET,
            "max_new_tokens": cfg.max_new_tokens,
            "per_device_train_batch_size": cfg.ppo_minibatch,
            "ppo_buffer_size": cfg.ppo_batch // cfg.ppo_minibatch,
            "ppo_epochs": cfg.ppo_epochs,
            "learning_rate": cfg.policy_lr,
            "critic_learning_rate": cfg.critic_lr,
            "lr_scheduler_type": "constant",
            "max_steps": cfg.ppo_iterations,
            "preset": cfg.preset,
            "kl_coef": cfg.kl_coef,
            "adap_kl_ctrl": False,
            "ppo_score_norm": cfg.score_norm,
            "logging_steps": 1,
            "save_steps": cfg.ppo_iterations,
            "max_to_keep": 1,
            "samples_every": 1,  # every response is kept: the gold curve is computed from them
            "num_samples": cfg.ppo_batch,
        }
    sft = stage == "sft"
    steps, batch, lr = (cfg.sft_steps, cfg.sft_batch, cfg.sft_lr) if sft else (cfg.rm_steps, cfg.rm_batch, cfg.rm_lr)
    return {
        **common,
        "model_name_or_path": path("init") if sft else path("sft"),
        "dataset": path("data", "sft.jsonl") if sft else path("data", "pairs.jsonl"),
        "output_dir": path(stage),
        "cutoff_len": 48,
        "pad_multiple": PROMPT_BUCKET,
        "per_device_train_batch_size": batch,
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": max(1, steps // 20),
        "max_steps": steps,
        "logging_steps": max(1, steps // 50),
        "save_steps": steps,
        "max_to_keep": 1,
    }


def stage_yaml(stage: str, out: str, cfg: DemoConfig) -> str:
    """`stage_config` as the text of a YAML config file."""
    import yaml

    header = f"# ppojax demo, stage {stage} (written by `ppojax demo --output-dir {out}`; the data comes from it too)\n"
    return header + yaml.safe_dump(stage_config(stage, out, cfg), sort_keys=False)


def write_stage_configs(out: str, cfg: DemoConfig) -> dict:
    """Writes <out>/configs/{sft,rm,ppo}.yaml; returns their paths."""
    directory = os.path.join(out, "configs")
    os.makedirs(directory, exist_ok=True)
    paths = {stage: os.path.join(directory, f"{stage}.yaml") for stage in ("sft", "rm", "ppo")}
    for stage, path in paths.items():
        atomic_write(path, stage_yaml(stage, out, cfg))
    return paths


def _train_stage(stage: str, out: str, cfg: DemoConfig, progress: bool) -> dict:
    """Runs `ppojax train` stage sft, rm or ppo through the runner; returns the runner's summary."""
    from ppojax import runner
    from ppojax.config import config_from_dict

    config = config_from_dict(stage_config(stage, out, cfg), source=os.path.join(out, "configs", f"{stage}.yaml"))
    return runner.run(config, progress=progress)


def label_pairs(
    rng: np.random.Generator, gold_a, gold_b, length_a, length_b, *, scale: float, length_bias: float = 0.0
) -> np.ndarray:
    """[B] bool, True where a is preferred: a noisy Bradley-Terry choice with
    P(a ≻ b) = σ((gold_a − gold_b) / scale + length_bias · (length_a − length_b))."""
    logits = (np.asarray(gold_a, np.float64) - gold_b) / scale + length_bias * (
        np.asarray(length_a, np.float64) - length_b
    )
    return rng.random(len(logits)) < 1.0 / (1.0 + np.exp(-logits))


def make_pairs(out: str, vocab: Vocabulary, policy, params, cfg: DemoConfig, key) -> dict:
    """Two SFT samples per prompt, labelled; pairs.jsonl (train) and pairs_heldout.jsonl (with gold)."""
    n = cfg.pair_prompts + cfg.heldout_pairs
    prompts = reviews.make_prompts(cfg.seed + 3, n)
    key_a, key_b = jax.random.split(key)
    a = sample_responses(vocab, policy, params, prompts, key_a, cfg=cfg)
    b = sample_responses(vocab, policy, params, prompts, key_b, cfg=cfg)
    gold_a = vocab.gold(a["prompt_ids"], a["prompt_mask"], a["response_ids"], a["response_mask"])
    gold_b = vocab.gold(b["prompt_ids"], b["prompt_mask"], b["response_ids"], b["response_mask"])
    len_a, len_b = a["response_mask"].sum(1), b["response_mask"].sum(1)
    a_wins = label_pairs(
        np.random.default_rng(cfg.seed + 4),
        gold_a,
        gold_b,
        len_a,
        len_b,
        scale=cfg.label_scale,
        length_bias=cfg.length_bias,
    )
    text_a = vocab.texts(a["response_ids"], a["response_mask"])
    text_b = vocab.texts(b["response_ids"], b["response_mask"])
    train, heldout = [], []
    for i, prompt in enumerate(prompts):
        if not text_a[i].strip() or not text_b[i].strip() or text_a[i] == text_b[i]:
            continue  # an empty response (EOS first) cannot be a preference row; equal ones carry no preference
        chosen, rejected = (text_a[i], text_b[i]) if a_wins[i] else (text_b[i], text_a[i])
        g_chosen, g_rejected = (gold_a[i], gold_b[i]) if a_wins[i] else (gold_b[i], gold_a[i])
        row = {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "gold_chosen": float(g_chosen),
            "gold_rejected": float(g_rejected),
        }
        (train if i < cfg.pair_prompts else heldout).append(row)
    data = os.path.join(out, "data")
    paths = {"pairs": os.path.join(data, "pairs.jsonl"), "heldout": os.path.join(data, "pairs_heldout.jsonl")}
    _write_jsonl(paths["pairs"], train)
    _write_jsonl(paths["heldout"], heldout)
    differs = gold_a != gold_b
    agree = np.mean((gold_a > gold_b)[differs] == a_wins[differs]) if differs.any() else float("nan")
    longer = len_a != len_b
    return {
        **paths,
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "label_agrees_with_gold": float(agree),
        "chosen_longer": float(np.mean((len_a > len_b)[longer] == a_wins[longer])) if longer.any() else float("nan"),
    }


def evaluate_reward_model(vocab, reward, reward_params, heldout_path: str, cfg: DemoConfig) -> dict:
    """Held-out pairwise accuracy against the labels and against gold, and the correlation of the RM's scores
    with gold over the held-out responses."""
    with open(heldout_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [r["prompt"] for r in rows]
    scores = {}
    for side in ("chosen", "rejected"):
        prompt_ids, prompt_mask = vocab.encode(prompts)
        resp = [vocab.tokenizer(r[side], add_special_tokens=False)["input_ids"] + [vocab.eos_id] for r in rows]
        width = cfg.max_new_tokens + 1
        response_ids = np.full((len(rows), width), vocab.pad_id, np.int32)
        response_mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(resp):
            response_ids[i, : len(r)], response_mask[i, : len(r)] = r[:width], 1
        scores[side] = np.asarray(
            _score_jit(reward, reward_params, prompt_ids, prompt_mask, response_ids, response_mask)
        )
    gold_c = np.array([r["gold_chosen"] for r in rows])
    gold_r = np.array([r["gold_rejected"] for r in rows])
    differs = gold_c != gold_r
    proxy = np.concatenate([scores["chosen"], scores["rejected"]])
    gold = np.concatenate([gold_c, gold_r])
    return {
        "accuracy": float(np.mean(scores["chosen"] > scores["rejected"])),
        "gold_accuracy": float(np.mean((scores["chosen"] > scores["rejected"])[differs] == (gold_c > gold_r)[differs])),
        "gold_correlation": float(np.corrcoef(proxy, gold)[0, 1]),
        "heldout_pairs": len(rows),
    }


_score_jit = jax.jit(sequence_reward, static_argnames=("model",))


def summarise_samples(vocab, s: dict, gain: float, bias: float) -> dict:
    gold = vocab.gold(s["prompt_ids"], s["prompt_mask"], s["response_ids"], s["response_mask"])
    proxy = gain * s["proxy"] + bias
    metrics = jax.device_get(diagnostics.hacking_metrics(s["response_ids"], s["response_mask"], proxy, gold))
    return {
        "gold_mean": float(gold.mean()),
        "gold_std": float(gold.std()),
        "proxy_mean": float(proxy.mean()),
        "kl_mean": float(s["kl"].mean()),
        "length_mean": float(s["response_mask"].sum(1).mean()),
        "repetition": float(metrics["hacking/repetition"]),
        "proxy_gold_corr": float(metrics["hacking/proxy_gold_corr"]),
        "entropy_per_token": float(s["nll"].sum() / max(1, s["response_mask"].sum())),
    }


def ppo_curve(out: str, vocab: Vocabulary, eos_text: str) -> list[dict]:
    """Per-iteration rows: the runner's metrics joined with gold, proxy, length, repetition and proxy-gold
    correlation computed from every logged response (ppo_metrics/samples.jsonl)."""
    from ppojax.reports import read_metrics_csv

    directory = os.path.join(out, "ppo", "ppo_metrics")
    by_step: dict = {}
    with open(os.path.join(directory, "samples.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], []).append(row)
    rows = []
    for metrics in read_metrics_csv(os.path.join(directory, "training_metrics.csv")):
        samples = by_step.get(int(metrics["step"]))
        if not samples:
            continue
        ended = [s["response"].endswith(eos_text) for s in samples]
        responses = [s["response"].removesuffix(eos_text) if e else s["response"] for s, e in zip(samples, ended)]
        gold = reviews.gold_rewards([s["prompt"] for s in samples], responses, ended)
        proxy = np.asarray([s["score"] for s in samples], np.float32)
        ids = [
            vocab.tokenizer(r, add_special_tokens=False)["input_ids"] + [vocab.eos_id] * e
            for r, e in zip(responses, ended)
        ]
        width = max(1, max(len(i) for i in ids))
        response_ids = np.full((len(ids), width), vocab.pad_id, np.int32)
        response_mask = np.zeros((len(ids), width), np.int32)
        for k, row_ids in enumerate(ids):
            response_ids[k, : len(row_ids)], response_mask[k, : len(row_ids)] = row_ids, 1
        hacking = diagnostics.hacking_metrics(response_ids, response_mask, proxy, gold)
        rows.append({**metrics, **{k: float(v) for k, v in jax.device_get(hacking).items()}})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline

# The settings each stage's output depends on (with those of the stages before it).
PPO_FIELDS = (
    "ppo_iterations",
    "ppo_batch",
    "ppo_minibatch",
    "ppo_epochs",
    "policy_lr",
    "critic_lr",
    "kl_coef",
    "kl_target",
    "preset",
    "score_norm",
    "eval_batch",
)
# The settings of the pairs and rm stages (the sft stage depends on none of them).
RM_FIELDS = (
    "pair_prompts",
    "heldout_pairs",
    "label_scale",
    "length_bias",
    "rm_steps",
    "rm_batch",
    "rm_lr",
    "max_new_tokens",
)
_STAGE_MARKER = "demo_stage.json"


def _stage_settings(cfg: DemoConfig, stage: str) -> dict:
    skip = PPO_FIELDS + (RM_FIELDS if stage == "sft" else ())
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _reusable(directory: str, cfg: DemoConfig, stage: str = "rm") -> bool:
    """True when `directory` holds a finished `stage` (sft or rm) of a run whose settings for it were the same."""
    path = os.path.join(directory, _STAGE_MARKER)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f) == _stage_settings(cfg, stage)


def _mark_done(directory: str, cfg: DemoConfig, stage: str = "rm") -> None:
    atomic_write(os.path.join(directory, _STAGE_MARKER), json.dumps(_stage_settings(cfg, stage), indent=1))


def run(
    out: str,
    cfg: DemoConfig = DemoConfig(),
    *,
    progress: bool = True,
    reuse: bool = False,
    until_rm: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Runs every stage into `out`; returns the report (also written to <out>/report.json).

    reuse: keep the data, sft, pairs and rm outputs of an earlier run in `out` made with the same settings
    (every field but the PPO ones, `PPO_FIELDS`), so a PPO sweep trains the SFT and reward models once."""
    from ppojax.data import load_tokenizer

    log = log or (lambda message: None)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    times, start = {}, time.time()

    def stage(name):
        times[name] = round(time.time() - start - sum(times.values()), 1)

    reused = reuse and _reusable(os.path.join(out, "rm"), cfg, "rm")
    sft_reused = reused or (reuse and _reusable(os.path.join(out, "sft"), cfg, "sft"))
    paths = _task_paths(out)
    write_stage_configs(out, cfg)
    if reused:
        log(f"[1-4/6] data, sft, pairs, rm: reusing {out} (same settings)")
        with open(os.path.join(out, "data", "pairs_summary.json"), encoding="utf-8") as f:
            pairs = {**json.load(f), "pairs": os.path.join(out, "data", "pairs.jsonl")}
        pairs["heldout"] = os.path.join(out, "data", "pairs_heldout.jsonl")
    elif sft_reused:
        log(f"[1-2/6] data, sft: reusing {out} (same settings)")
    else:
        log(
            f"[1/6] data: {cfg.corpus_size} reviews, {cfg.train_prompts} prompts, tokenizer, random Qwen2 model -> {out}/data"
        )
        paths = write_task(out, cfg)
        stage("data")
        log(f"[2/6] sft: {cfg.sft_steps} steps from scratch -> {out}/sft")
        _train_stage("sft", out, cfg, progress)
        _mark_done(os.path.join(out, "sft"), cfg, "sft")
        stage("sft")
    vocab = Vocabulary(load_tokenizer(os.path.join(out, "sft")))
    policy, sft_params = load_pretrained(os.path.join(out, "sft"), head="lm")
    key = jax.random.PRNGKey(cfg.seed + 7)
    if not reused:
        log(
            f"[3/6] pairs: 2 SFT samples for each of {cfg.pair_prompts + cfg.heldout_pairs} prompts, Bradley-Terry labels"
            + (f" biased to length ({cfg.length_bias}/token)" if cfg.length_bias else "")
        )
        pairs = make_pairs(out, vocab, policy, sft_params, cfg, jax.random.fold_in(key, 0))
        atomic_write(os.path.join(out, "data", "pairs_summary.json"), json.dumps(pairs, indent=1))
        stage("pairs")
        log(f"[4/6] rm: {cfg.rm_steps} steps from the SFT model -> {out}/rm")
        _train_stage("rm", out, cfg, progress)
        _mark_done(os.path.join(out, "rm"), cfg, "rm")
    reward, reward_params = load_pretrained(os.path.join(out, "rm"), head="reward")
    rm_eval = evaluate_reward_model(vocab, reward, reward_params, pairs["heldout"], cfg)
    if until_rm:
        return {"pairs": pairs, "rm": rm_eval}
    eval_prompts = read_prompts(paths["eval_prompts"])
    before = sample_responses(
        vocab,
        policy,
        sft_params,
        eval_prompts,
        jax.random.fold_in(key, 1),
        cfg=cfg,
        reward=reward,
        reward_params=reward_params,
    )
    stage("rm")
    log(f"[5/6] ppo: {cfg.ppo_iterations} iterations of {cfg.ppo_batch} prompts, β = {cfg.kl_coef} -> {out}/ppo")
    summary = _train_stage("ppo", out, cfg, progress)
    control = summary["run_control"]
    gain, bias = control["reward_gain"], control["reward_bias"]
    _, ppo_params = load_pretrained(os.path.join(out, "ppo"), head="lm")
    rows = ppo_curve(out, vocab, vocab.tokenizer.eos_token)
    flags = diagnostics.hacking_flags(rows)
    stage("ppo")
    log("[6/6] evaluate: SFT vs PPO on held-out prompts")
    after = sample_responses(
        vocab,
        policy,
        ppo_params,
        eval_prompts,
        jax.random.fold_in(key, 2),
        cfg=cfg,
        ref_params=sft_params,
        reward=reward,
        reward_params=reward_params,
    )
    report = {
        "config": dataclasses.asdict(cfg),
        "pairs": {k: v for k, v in pairs.items() if k not in ("pairs", "heldout")},
        "rm": rm_eval,
        "reward_normalisation": {"gain": gain, "bias": bias},
        "sft": summarise_samples(vocab, before, gain, bias),
        "ppo": summarise_samples(vocab, after, gain, bias),
        "ppo_status": summary["status"],
        "hacking_flags": [f._asdict() for f in flags],
        "samples": {
            "prompts": eval_prompts[:6],
            "sft": vocab.texts(before["response_ids"][:6], before["response_mask"][:6]),
            "ppo": vocab.texts(after["response_ids"][:6], after["response_mask"][:6]),
        },
    }
    report["gold_gain_in_sft_std"] = (report["ppo"]["gold_mean"] - report["sft"]["gold_mean"]) / max(
        report["sft"]["gold_std"], 1e-8
    )
    report["kl_under_target"] = report["ppo"]["kl_mean"] < cfg.kl_target
    report["plot"] = plot_run(os.path.join(out, "demo.png"), rows, report, cfg)
    stage("evaluate")
    report["seconds"] = {**times, "total": round(time.time() - start, 1)}
    report["machine"] = machine_description()
    atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=2) + "\n")
    log(format_report(report, out))
    return report


def machine_description() -> str:
    import platform

    return f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}"


def format_report(report: dict, out: str) -> str:
    s, p, rm = report["sft"], report["ppo"], report["rm"]
    lines = [
        "",
        "                      SFT        PPO",
        (
            f"gold reward      {s['gold_mean']:+8.3f}   {p['gold_mean']:+8.3f}   (SFT std {s['gold_std']:.3f}; "
            f"gain {report['gold_gain_in_sft_std']:+.2f} std)"
        ),
        f"proxy reward     {s['proxy_mean']:+8.3f}   {p['proxy_mean']:+8.3f}   (RM score, normalised on SFT samples)",
        (
            f"KL to reference  {s['kl_mean']:8.3f}   {p['kl_mean']:8.3f}   nats/sequence (target < "
            f"{report['config']['kl_target']})"
        ),
        f"length           {s['length_mean']:8.2f}   {p['length_mean']:8.2f}   tokens",
        f"repetition       {s['repetition']:8.3f}   {p['repetition']:8.3f}   (repeated bigrams)",
        (
            f"RM held-out accuracy {rm['accuracy']:.3f} vs labels, {rm['gold_accuracy']:.3f} vs gold; "
            f"correlation with gold {rm['gold_correlation']:.3f}"
        ),
        "reward-hacking diagnostics:",
        *(
            "  " + line
            for line in diagnostics.format_flags([diagnostics.Flag(**f) for f in report["hacking_flags"]]).splitlines()
        ),
        "samples (prompt | SFT | PPO):",
        *(
            f"  {q} | {a} | {b}"
            for q, a, b in zip(report["samples"]["prompts"][:3], report["samples"]["sft"], report["samples"]["ppo"])
        ),
        f"plots: {report['plot']}  and {out}/<stage>/<stage>_metrics/training_curves.png",
        f"report: {out}/report.json  ({report['seconds']['total']:.0f} s)",
    ]
    return "\n".join(lines)


def plot_run(path: str, rows: list, report: dict, cfg: DemoConfig) -> str:
    """Gold and proxy reward, KL and length over the PPO iterations, with the SFT levels dashed."""
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    figure = Figure(figsize=(12, 3.4), dpi=90)
    panels = (
        ("reward", (("hacking/gold_mean", "gold"), ("hacking/proxy_mean", "proxy (RM)"))),
        ("KL to reference (nats / sequence)", (("objective/kl", "KL"),)),
        ("response length (tokens)", (("hacking/length_mean", "length"),)),
    )
    for i, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(1, 3, i + 1)
        for key, label in keys:
            axes.plot(steps, [r.get(key, np.nan) for r in rows], label=label, linewidth=1.3)
        if i == 0:
            axes.axhline(report["sft"]["gold_mean"], color="C0", linestyle="--", linewidth=0.8, label="SFT gold")
            axes.legend(fontsize=8)
        if i == 1:
            axes.axhline(cfg.kl_target, color="red", linestyle=":", linewidth=0.8, label="target")
            axes.legend(fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("PPO iteration", fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(
        f"ppojax demo: gold {report['sft']['gold_mean']:+.2f} → {report['ppo']['gold_mean']:+.2f} "
        f"({report['gold_gain_in_sft_std']:+.1f} SFT std) at KL {report['ppo']['kl_mean']:.2f}",
        fontsize=11,
    )
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return path
