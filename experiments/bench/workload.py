"""The PPO benchmark workload (issue 9), built offline into a directory that every library loads.

    <dir>/tokenizer/          byte-level BPE, vocab 512, trained here with `tokenizers`; <pad> = 0, <eos> = 1
    <dir>/policy/             Qwen2ForCausalLM, random weights (also the reference policy)
    <dir>/reward/             Qwen2ForSequenceClassification, one label (also the critic's initialisation)
    <dir>/workload.json       the `Workload` fields and the prompts (token ids, unpadded)

Every library reads the same files: ppojax through `ppojax.models.load_pretrained`, TRL through
`AutoModelFor*.from_pretrained`. This module needs only numpy, torch, transformers and tokenizers, so the
TRL worker (another virtual environment) can import it too.

Presets (`WORKLOADS`):
  cpu:  issue 9's CPU workload: hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 688, tied embeddings,
        fp32 (~3.0M params); 64 prompts of 10–16 tokens left-padded to 16; 32 new tokens at T 0.7, no stop
        token; 4 PPO epochs; kl 0.05 (k1), γ 1, λ 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, AdamW lr 3e-6.
  h200: Qwen2.5-0.5B shapes (vocab 151936, hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
        tied), bf16; 256 prompts of 128 tokens, 256 new tokens; the same PPO settings.
  tiny: a seconds-long smoke version of `cpu` for checking the scripts' logic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

PAD_ID = 0
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    dtype: str = "float32"
    batch_size: int = 64
    prompt_min: int = 10
    prompt_max: int = 16  # also the padded prompt width
    new_tokens: int = 32
    temperature: float = 0.7
    ppo_epochs: int = 4
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    learning_rate: float = 3e-6
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def sequence_length(self) -> int:
        return self.prompt_max + self.new_tokens


WORKLOADS = {
    "cpu": Workload(name="cpu"),
    "h200": Workload(
        name="h200",
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        dtype="bfloat16",
        batch_size=256,
        prompt_min=128,
        prompt_max=128,
        new_tokens=256,
    ),
    "tiny": Workload(
        name="tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        batch_size=8,
        prompt_min=3,
        prompt_max=6,
        new_tokens=4,
        ppo_epochs=2,
    ),
}

TOKENIZER_VOCAB = 512  # the BPE tokenizer; larger model vocabularies (h200) just have unused ids


# ----------------------------------------------------------------------------------------------------------
# Analytic FLOPs (2 per multiply-add of every matmul the algorithm needs)


def matmul_params(w: Workload) -> int:
    """Weights one token passes through in the decoder layers (q, k, v, o, gate, up, down)."""
    kv = w.num_kv_heads * w.head_dim
    per_layer = 2 * w.hidden_size * w.hidden_size + 2 * w.hidden_size * kv + 3 * w.hidden_size * w.intermediate_size
    return w.num_layers * per_layer


def forward_flops(w: Workload, tokens: int, context: float, lm_tokens: int) -> float:
    """Model FLOPs of one forward pass: `tokens` positions through the layers, each attending over `context`
    keys (QKᵀ and AV: 2 · 2 · context · hidden per layer), and `lm_tokens` positions through the LM head
    (2 · hidden · vocab each). Norms, RoPE, softmax, the value / score head (hidden × 1) are left out (< 1 %)."""
    layers = 2.0 * matmul_params(w) * tokens
    attention = 4.0 * context * w.hidden_size * w.num_layers * tokens
    return layers + attention + 2.0 * w.hidden_size * w.vocab_size * lm_tokens


def phase_flops(w: Workload) -> dict[str, float]:
    """Model FLOPs per PPO update, per phase (the formula is written in README / BUILD_NOTES):

    generate: the prefill (B · P positions, dense P × P attention, LM head at the last position only) and
      N − 1 decode steps (step t: B positions attending over P + t cached keys, LM head on each).
    score:    three teacher-forced passes over S = P + N positions: the reference (LM head on the N response
      positions) and the critic and the reward model (no LM head). The policy's own log-probs are the
      sampler's, so a fourth pass is not counted (ppojax runs one, for an exact first-minibatch ratio; TRL
      reads the generate scores).
    train:    epochs × (policy + critic forward, 3× for forward + backward) over all B rows and S positions.
    Attention is counted dense (S × S), as both libraries execute it.
    """
    b, p, n, s = w.batch_size, w.prompt_max, w.new_tokens, w.sequence_length
    prefill = forward_flops(w, b * p, p, b)
    decode = sum(forward_flops(w, b, p + t, b) for t in range(1, n))
    policy_pass = forward_flops(w, b * s, s, b * n)
    trunk_pass = forward_flops(w, b * s, s, 0)
    return {
        "generate": prefill + decode,
        "score": policy_pass + 2 * trunk_pass,
        "train": w.ppo_epochs * 3.0 * (policy_pass + trunk_pass),
    }


def pruned_train_flops(w: Workload) -> float:
    """Of `phase_flops(w)["train"]`, the model FLOPs ppojax does not execute: its forwards ask for the head at the
    response columns only (`apply(head_at=...)`), so the last layer computes queries, attention, the
    o-projection and the MLP only there (keys and values at every column). Skipped per pass: the S − N other
    columns of every row through the last layer's weights but K / V, and their queries' attention over S keys;
    policy and critic, 3× for forward + backward, every epoch. `phase_flops` stays the nominal count (what TRL
    executes): divide the time into it for throughput, into nominal − pruned for hardware utilisation."""
    b, s, n = w.batch_size, w.sequence_length, w.new_tokens
    kv_params = 2 * w.num_kv_heads * w.head_dim * w.hidden_size
    query_side_params = matmul_params(w) / w.num_layers - kv_params
    per_pass = b * (s - n) * (2.0 * query_side_params + 4.0 * s * w.hidden_size)
    return w.ppo_epochs * 3.0 * 2 * per_pass


def dtype_bytes(w: Workload) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[w.dtype]


def decode_bytes(w: Workload) -> float:
    """HBM/DRAM bytes the N − 1 decode steps must read at least: every step reads the policy's weights once
    (decoder matmuls + the tied embedding as LM head) and the KV cache written so far (B rows × context ×
    layers × K and V × KV heads × head dim). Activations are left out (small at these batch sizes).
    `decode_bytes / bandwidth` is the bandwidth roofline of the decode loop."""
    b, p, n = w.batch_size, w.prompt_max, w.new_tokens
    weights = (matmul_params(w) + w.vocab_size * w.hidden_size) * dtype_bytes(w)
    kv_per_position = w.num_layers * 2 * w.num_kv_heads * w.head_dim * dtype_bytes(w)
    return sum(weights + b * (p + t) * kv_per_position for t in range(1, n))


def param_count(w: Workload) -> int:
    norms = w.num_layers * 2 * w.hidden_size + w.hidden_size
    biases = w.num_layers * (w.hidden_size + 2 * w.num_kv_heads * w.head_dim)  # Qwen2: q/k/v biases
    return matmul_params(w) + w.vocab_size * w.hidden_size + norms + biases


# ----------------------------------------------------------------------------------------------------------
# Building


def make_prompts(w: Workload) -> list[list[int]]:
    """`batch_size` prompts of prompt_min..prompt_max tokens (ids 2..511, no pad / eos); the first has the
    maximum length so every batch pads to exactly `prompt_max` columns."""
    rng = np.random.default_rng(w.seed)
    lengths = rng.integers(w.prompt_min, w.prompt_max + 1, w.batch_size)
    lengths[0] = w.prompt_max
    return [rng.integers(2, TOKENIZER_VOCAB, int(n)).tolist() for n in lengths]


def _corpus(seed: int, lines: int = 1000) -> list[str]:
    """Pseudo-text: words of 1–4 random syllables (enough distinct pairs for 254 merges)."""
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["the", "and", "ing", "ion", "er"]
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(1000)]
    return [" ".join(rng.choice(words, rng.integers(5, 20))) + "." for _ in range(lines)]


def build_tokenizer(directory: str, seed: int = 0):
    """Byte-level BPE with exactly 512 ids: <pad> 0, <eos> 1, the 256 bytes, 254 merges. Left padding."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(seed), trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    if (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) != (TOKENIZER_VOCAB, PAD_ID, EOS_ID):
        raise RuntimeError(
            f"tokenizer: expected {TOKENIZER_VOCAB} ids with pad {PAD_ID} and eos {EOS_ID}, "
            f"got {len(tokenizer)} ids, pad {tokenizer.pad_token_id}, eos {tokenizer.eos_token_id}"
        )
    tokenizer.save_pretrained(directory)
    return tokenizer


def qwen2_config(w: Workload):
    import transformers

    return transformers.Qwen2Config(
        vocab_size=w.vocab_size,
        hidden_size=w.hidden_size,
        intermediate_size=w.intermediate_size,
        num_hidden_layers=w.num_layers,
        num_attention_heads=w.num_heads,
        num_key_value_heads=w.num_kv_heads,
        max_position_embeddings=max(512, 2 * w.sequence_length),
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=None,
        num_labels=1,
        dtype=w.dtype,
    )


def build(w: Workload, directory: str) -> dict:
    """Write the tokenizer, policy, reward model and workload.json under `directory`; returns the paths."""
    import torch
    import transformers

    paths = {name: os.path.join(directory, name) for name in ("tokenizer", "policy", "reward")}
    build_tokenizer(paths["tokenizer"], w.seed)
    dtype = getattr(torch, w.dtype)
    torch.manual_seed(w.seed)
    policy = transformers.Qwen2ForCausalLM(qwen2_config(w)).to(dtype)
    # No stop token: generation never ends early on EOS (TRL and transformers read this file).
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = PAD_ID
    policy.save_pretrained(paths["policy"])
    torch.manual_seed(w.seed + 1)
    reward = transformers.Qwen2ForSequenceClassification(qwen2_config(w)).to(dtype)
    reward.save_pretrained(paths["reward"])
    with open(os.path.join(directory, "workload.json"), "w") as f:
        json.dump({"workload": dataclasses.asdict(w), "prompts": make_prompts(w)}, f)
    return paths


def load(directory: str) -> tuple[Workload, list[list[int]]]:
    with open(os.path.join(directory, "workload.json")) as f:
        raw = json.load(f)
    return Workload(**raw["workload"]), raw["prompts"]


def get(name: str, **overrides) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r}: expected one of {sorted(WORKLOADS)}")
    return dataclasses.replace(WORKLOADS[name], **overrides) if overrides else WORKLOADS[name]


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def current_rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ----------------------------------------------------------------------------------------------------------
# Worker protocol: the coordinator writes one command per line on a worker's stdin; the worker answers with
# one `@@bench <json>` line on stdout (libraries may print other lines, which the coordinator ignores).

TAG = "@@bench "


def emit(message: dict) -> None:
    print(TAG + json.dumps(message), flush=True)


def read_command() -> str:
    line = sys.stdin.readline()
    return line.strip() or "quit"


def process_times() -> tuple[float, float]:
    """(wall seconds, process CPU seconds) now."""
    return time.perf_counter(), time.process_time()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a benchmark workload directory.")
    parser.add_argument("--build", required=True, metavar="DIR")
    parser.add_argument("--workload", default="cpu", choices=sorted(WORKLOADS))
    cli = parser.parse_args()
    print(build(get(cli.workload), cli.build))
