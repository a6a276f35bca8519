"""Run configuration for `ppojax train CONFIG.yaml [key=value ...]`: one frozen, typed, validated record.

Keys follow LLaMA-Factory's names where it has one, accept the PPO names TRL users know as aliases, and are
checked before anything is compiled. Every problem is a `ConfigError` whose message is one line naming the
source (file or "command line"), the key, the value found and what is allowed.

Batch sizes (LLaMA-Factory / TRL 0.x semantics, all per data-parallel device):
  micro batch     = per_device_train_batch_size          rows per forward/backward pass (TRL 0.x mini_batch_size)
  optimizer batch = micro × gradient_accumulation_steps  rows per optimizer step (one PPO minibatch)
  rollout batch   = optimizer batch × ppo_buffer_size    prompts sampled per PPO iteration (TRL 0.x batch_size)

KL defaults: LLaMA-Factory passes no KL settings to TRL 0.x's PPOConfig, so its runs use TRL 0.x's defaults:
an adaptive controller from init_kl_coef 0.2 towards `ppo_target` (6 nats per sequence), horizon 10000. With
`preset` unset ppojax does the same on top of the `ppojax` convention; with `preset` set the named
convention's values apply. Keys given explicitly override either.

| key | default | meaning |
| --- | --- | --- |
| model_name_or_path | required | local Hugging Face directory (config.json + safetensors) of the policy / model to train |
| stage | required | sft, rm (reward model) or ppo |
| do_train | true | must be true: ppojax only trains (evaluation-only runs are not supported) |
| finetuning_type | lora | full or lora |
| lora_rank | 8 | LoRA rank (> 0) |
| lora_alpha | 2 × lora_rank | LoRA alpha; scale = alpha / rank (LLaMA-Factory's default alpha is rank × 2) |
| use_rslora | false | rank-stabilised LoRA: scale = alpha / √rank instead of alpha / rank (PEFT's and LLaMA-Factory's key) |
| lora_target | all | all, or a comma list of projections: q k v o gate up down (HF names q_proj ... down_proj accepted) |
| reward_model | (ppo: required) | local directory of the reward model: a ppojax `stage: rm` output_dir (HF sequence classifier), or a LLaMA-Factory `stage: rm` output_dir (`value_head.safetensors` beside a causal LM, or beside a LoRA adapter, which is applied to model_name_or_path as LLaMA-Factory does) |
| reward_model_type | null | LLaMA-Factory's key, checked against the directory: full or lora (null: whatever the directory holds) |
| ref_model | null | local HF directory of the reference policy (same architecture); null: the initial policy (LoRA: the base, adapters off). With LoRA the adapters still sit on model_name_or_path and the reference is this model (LLaMA-Factory's rule; one more copy of the weights) |
| ref_model_adapters | null | PEFT LoRA adapters (a comma list of local directories) merged into ref_model as it is read (LLaMA-Factory's key); needs ref_model |
| reward_model_adapters | null | LLaMA-Factory's key for a full reward_model: PEFT LoRA adapters applied to it, the last one a LLaMA-Factory LoRA stage: rm output_dir (its value_head.safetensors is the head, as LLaMA-Factory reads it); the others are merged first |
| adapter_name_or_path | null | lora: PEFT LoRA adapters (a comma list of local directories, e.g. LLaMA-Factory's LoRA sft output_dir) on model_name_or_path, as LLaMA-Factory uses them: every adapter but the last is merged into the weights, the last is trained further (so the reference, the policy with its adapter off, includes only the merged ones) |
| create_new_adapter | false | with adapter_name_or_path: merge every adapter and train a new one (lora_rank, lora_alpha, lora_target); the reference then includes them all |
| dataset | required | a local .json (array) or .jsonl file (see ppojax/data.py for the formats), or LLaMA-Factory dataset names (a comma list) described in dataset_dir's dataset_info.json: local files, alpaca / sharegpt / openai formatting, columns and tags (ppojax/dataset_info.py) |
| dataset_dir | null | directory `dataset` is relative to (else the current directory); LLaMA-Factory dataset names are looked up in its dataset_info.json (else in data/dataset_info.json, LLaMA-Factory's default) |
| template | default | chat template: any name (qwen, llama3, ...) uses the tokenizer's own chat template; none / default / empty = raw text |
| default_system | null | system prompt for records without one (a record's own system field / turn wins, as in LLaMA-Factory); needs a chat template. null: the chat template's own default, if it has one |
| enable_thinking | null | the chat template's thinking switch (LLaMA-Factory's key): false renders Qwen3's empty think block after the generation prompt (no reasoning), true asks for thinking; null: the template's default. Templates without the switch ignore it, as LLaMA-Factory's non-reasoning templates do |
| cutoff_len | 2048 | sft / rm: maximum tokens of prompt + response (longer rows are cut, counted and reported) |
| max_prompt_length | 512 | ppo: maximum prompt tokens |
| pad_multiple | 64 | sft / rm: prompt and response widths are padded to a multiple of this (fewer compiled shapes vs less padding) |
| prompt_overflow | truncate | ppo: a longer prompt is truncate-d (its first tokens dropped, rows counted) or refuse-d (error naming the row) |
| per_device_train_batch_size | 1 | micro batch (alias: mini_batch_size) |
| gradient_accumulation_steps | 1 | micro batches per optimizer step |
| ppo_buffer_size | 1 | optimizer batches per rollout batch (LLaMA-Factory: "mini-batches to make the experience buffer") |
| batch_size | optimizer batch × ppo_buffer_size | TRL 0.x name for the rollout batch; must be a multiple of the optimizer batch |
| learning_rate | 5e-5 | peak learning rate (the policy's; sft / rm: the model's) |
| critic_learning_rate | learning_rate | ppo: the critic's learning rate |
| lr_scheduler_type | linear | constant, linear (to 0 at the last step) or cosine (half a cosine to 0, transformers' get_cosine_schedule_with_warmup) |
| warmup_steps | 0 | linear warm-up optimizer steps |
| warmup_ratio | null | warm-up as a fraction of the run's optimizer steps (ceil(ratio × steps), as transformers); not with warmup_steps |
| max_samples | null | use only the first max_samples records of the dataset (LLaMA-Factory's debugging cap) |
| max_grad_norm | 1.0 | clip gradients by global norm at every optimizer step; 0 turns clipping off (LLaMA-Factory 0.9.x's PPO, through TRL 0.9.6, clips only the first step of a run) |
| weight_decay | 0.0 | AdamW's decoupled weight decay, on every trained parameter but biases and normalisation weights (transformers' Trainer rule, which LLaMA-Factory uses); ppo: policy and critic |
| adam_beta1 | 0.9 | Adam β1 (transformers' name) |
| adam_beta2 | 0.999 | Adam β2 |
| adam_epsilon | 1e-8 | Adam ε (PyTorch's form: outside the square root, after bias correction) |
| optim | adamw_torch | transformers' optimizer name: adamw_torch, adamw_torch_fused, adamw_torch_xla or adamw_torch_npu_fused (one update rule, PyTorch's AdamW, which ppojax implements); others are refused |
| num_train_epochs | 3.0 | passes over the dataset (ppo: over the prompts) |
| max_steps | -1 | if > 0, stop after this many iterations (ppo) / optimizer steps (sft, rm); overrides num_train_epochs |
| ppo_epochs | 4 | optimisation passes over each rollout batch |
| ppo_target | preset (6.0) | adaptive-KL target, nats per sequence (aliases: kl_target, target). Needs adap_kl_ctrl |
| ppo_score_norm | false | normalise reward-model scores to mean 0, std 1 over the initial policy's responses (at least 64, sampled once before training; the gain and bias are kept in the checkpoints and summary.json) |
| ppo_whiten_rewards | preset (false) | whiten the shaped rewards before GAE, mean kept (alias: whiten_rewards) |
| preset | null | ppojax, trl, openrlhf, verl, llamafactory or openai: a `ppojax.presets.Convention`; null: ppojax + LLaMA-Factory's KL defaults. llamafactory is TRL 0.9.6's PPOTrainer as LLaMA-Factory runs it (its micro-batch loss averaging, ratio_threshold 10 and log-probs at T = 1 included) |
| kl_coef | preset (0.2 when preset is null) | β, the initial KL coefficient (alias: init_kl_coef) |
| adap_kl_ctrl | preset (true when preset is null) | adaptive KL controller (Ziegler et al.) instead of a fixed β |
| horizon | preset (10000) | adaptive controller horizon |
| kl_estimator | preset (k1) | k1, k2, k3 or abs (TRL 0.x kl_penalty kl / mse / abs = k1 / k2 / abs) |
| cliprange | preset (0.2) | policy ratio clip ε |
| cliprange_value | preset | value clip ε_v; null: no value clipping |
| vf_coef | preset (0.1) | value-loss weight in a joint loss |
| gamma | preset (1.0) | discount γ |
| lam | preset | GAE λ |
| missing_eos_penalty | preset (null) | subtracted from the score of responses without a stop token |
| entropy_coef | 0.0 | entropy bonus weight |
| target_kl | null | TRL 0.x early stopping: skip the rest of an iteration's updates once approx-KL exceeds 1.5 × target_kl. NOT the adaptive target (that is ppo_target) |
| early_stop_kl | 10.0 | mean KL to the reference (objective/kl, nats per sequence) above which an iteration is rejected (see on_kl_exceeded); a non-finite loss or KL is rejected too; null: KL never rejects |
| on_kl_exceeded | rollback | stop (keep the current weights), rollback (restore the last good checkpoint and stop), or rollback_continue (restore it and go on, at most max_rollbacks times) |
| max_rollbacks | 3 | rollback_continue: how many restores before stopping (then as rollback) |
| rollback_lr_scale | 0.5 | rollback_continue: the learning rates are multiplied by this at each restore (1: unchanged) |
| rollback_kl_coef_scale | 1.0 | rollback_continue: the KL coefficient β is multiplied by this at each restore (> 1 holds the policy closer) |
| critic_mode | separate | ppo: separate (a critic model initialised from the reward model, its own optimizer at critic_learning_rate), joint (the same critic, one optimizer on pg + vf_coef · vf), shared (a zero-initialised value head on the policy trunk, LLaMA-Factory's layout) |
| value_head_bias | null | critic_mode shared: give the value head a bias (zero-initialised, trained), as TRL's value head in LLaMA-Factory has; null: true with preset llamafactory, else false |
| old_logprobs | score | ppo: where the old log-probs of the PPO ratio come from: score (a teacher-forced policy pass after sampling; ratio 1 within float32 rounding on the first minibatch) or rollout (the log-probs recorded while sampling, TRL's choice: one forward pass fewer per iteration; policy/logprob_gap is then 0) |
| max_new_tokens | 1024 | response length in tokens (LLaMA-Factory's default) |
| temperature | 1.0 | sampling temperature (> 0); LLaMA-Factory's chat default 0.95 is not used: PPO samples the full distribution |
| logprob_temperature | null | ppo: temperature of the old / new / reference log-probs (ratio, KL) and the entropy; null: the preset's (llamafactory: 1.0, TRL 0.x scores untempered logits), else the sampling temperature |
| top_p | 1.0 | nucleus sampling (0, 1]; < 1 samples a truncated distribution (PPO_DETAILS item 5) |
| top_k | 0 | top-k sampling; 0 = off |
| repetition_penalty | 1.0 | ppo: transformers' repetition penalty while sampling (> 0; 1 = off): the logit of a token already in the prompt or response is divided by it if positive, multiplied if negative. Like top_k / top_p it changes what is sampled, not the log-probs of the PPO ratio and KL |
| do_sample, num_beams, skip_special_tokens | true, 1, true | LLaMA-Factory's generation keys, accepted at these values only (ppojax samples one response per prompt and decodes samples without special tokens) |
| bf16 | false | bfloat16 weights and compute (losses and statistics stay float32) |
| seed | 42 | seeds the PRNG key and the data order |
| output_dir | required | where models, checkpoints and reports go |
| overwrite_output_dir | false | allow a fresh run in an output_dir that already has checkpoints |
| logging_steps | 10 | write a metrics row every N iterations / steps |
| save_steps | 500 | save a checkpoint every N iterations / steps |
| max_to_keep | 3 | checkpoints kept (alias: save_total_limit); null keeps all |
| resume | null (auto) | null: continue from the latest checkpoint in output_dir if there is one (LLaMA-Factory's rule; the settings must be the same); true: the same; false: refuse to start over existing checkpoints (alias: resume_from_checkpoint) |
| samples_every | 10 | ppo: append prompt / response / score rows to samples.jsonl every N iterations; 0: never |
| num_samples | 4 | ppo: rows written each time |
| tensorboard | false | also write TensorBoard event files (only if tensorboardX or tensorboard is installed) |
| mesh | null | device mesh (every stage), e.g. {data: 2, fsdp: 4, tensor: 1} over all devices of all hosts (one size may be -1: the rest); null: one program on the default device, or with `distributed` every device on data. See README "Many devices and hosts" |
| distributed | null | multi-host start (every stage; run the same command on every host): auto (JAX cluster detection: TPU pods, SLURM, Open MPI), or {coordinator_address: host:port, num_processes: N, process_id: i}; null: the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables when set. Process 0 writes the reports and models; every process saves its checkpoint shards (output_dir on a filesystem every host sees) |
| rm_max_length_diff | null | rm: drop pairs whose chosen and rejected responses differ by more than this many tokens (counted in summary.json); null keeps all |
| length_reward | preset (none) | ppo: none, penalty (score − length_penalty × response tokens) or sqrt (score / √response tokens), against a reward model's length bias |
| length_penalty | preset (0) | ppo: c in length_reward: penalty (> 0 there, 0 otherwise) |
| stages | null | ppo: a list of training stages run in order, each {name?, iterations, overrides...}; overrides (flat or under `overrides:`) among learning_rate, critic_learning_rate, cliprange, cliprange_value, kl_coef (β at the stage's start), ppo_target, ppo_epochs, entropy_coef, vf_coef, target_kl. The run's iterations are their sum (max_steps, if set, must equal it) |
| kl_rule | preset (proportional) | how an adaptive β moves: proportional (Ziegler) or step (KL > 1.5 × target: β × 1.5; KL < 0.5 × target: β × 0.75). Needs adap_kl_ctrl |
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import typing
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ppojax.kl import KL_ESTIMATORS, KL_RULES
from ppojax.presets import PRESETS, Convention
from ppojax.rewards import LENGTH_REWARDS


class ConfigError(ValueError):
    """A bad configuration or data file. The message is one line, fit to print without a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


STAGES = ("sft", "rm", "ppo")
FINETUNING_TYPES = ("full", "lora")
REWARD_MODEL_TYPES = ("full", "lora")  # LLaMA-Factory's; its "api" (a reward server) and "oft" are not read
SCHEDULERS = ("constant", "linear", "cosine")  # ppojax.optim schedules (transformers' formulas)
# transformers' optimizer names whose update rule is torch.optim.AdamW (fused / XLA / NPU kernels of it).
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused")
PROMPT_OVERFLOW = ("truncate", "refuse")
ON_KL_EXCEEDED = ("stop", "rollback", "rollback_continue")
CRITIC_MODES = ("separate", "joint", "shared")
OLD_LOGPROBS = ("score", "rollout")  # as ppojax.train.OLD_LOGPROBS
RAW_TEMPLATES = ("none", "default", "empty", "raw")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# HF module names (LLaMA-Factory's lora_target values) -> ours.
_HF_LORA_NAMES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "c_attn": "q",
    "c_fc": "up",
    "c_proj": "down",
    "qkv": "q",
}


def _key(default=dataclasses.MISSING, *, choices=None, low=None, high=None, low_open=False, path=None):
    """A config key: `low`/`high` bound numbers (`low_open`: strictly above low); `path`: "dir" or "file"
    must exist (relative paths are taken from the current directory, or `dataset_dir` for the dataset)."""
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open, "path": path}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A validated `ppojax train` configuration (see the module docstring for every key). Paths are absolute."""

    model_name_or_path: str = _key(path="dir")
    stage: str = _key(choices=STAGES)
    dataset: str = _key(path="file")
    output_dir: str = _key()
    do_train: bool = _key(True)
    finetuning_type: str = _key("lora", choices=FINETUNING_TYPES)
    lora_rank: int = _key(8, low=1)
    lora_alpha: Optional[float] = _key(None, low=0.0, low_open=True)
    use_rslora: bool = _key(False)
    lora_target: Union[str, tuple] = _key("all")
    reward_model: Optional[str] = _key(None, path="dir")
    reward_model_type: Optional[str] = _key(None, choices=REWARD_MODEL_TYPES)
    ref_model: Optional[str] = _key(None, path="dir")
    ref_model_adapters: Optional[tuple] = _key(None)
    reward_model_adapters: Optional[tuple] = _key(None)
    adapter_name_or_path: Optional[tuple] = _key(None)
    create_new_adapter: bool = _key(False)
    dataset_dir: Optional[str] = _key(None, path="dir")
    template: str = _key("default")
    default_system: Optional[str] = _key(None)
    enable_thinking: Optional[bool] = _key(None)
    cutoff_len: int = _key(2048, low=2)
    max_prompt_length: int = _key(512, low=1)
    pad_multiple: int = _key(64, low=1)
    prompt_overflow: str = _key("truncate", choices=PROMPT_OVERFLOW)
    per_device_train_batch_size: int = _key(1, low=1)
    gradient_accumulation_steps: int = _key(1, low=1)
    ppo_buffer_size: Optional[int] = _key(None, low=1)
    batch_size: Optional[int] = _key(None, low=1)
    learning_rate: float = _key(5e-5, low=0.0, low_open=True)
    critic_learning_rate: Optional[float] = _key(None, low=0.0, low_open=True)
    lr_scheduler_type: str = _key("linear", choices=SCHEDULERS)
    warmup_steps: int = _key(0, low=0)
    warmup_ratio: Optional[float] = _key(None, low=0.0, high=1.0)
    max_samples: Optional[int] = _key(None, low=1)
    max_grad_norm: float = _key(1.0, low=0.0)
    weight_decay: float = _key(0.0, low=0.0)
    adam_beta1: float = _key(0.9, low=0.0)
    adam_beta2: float = _key(0.999, low=0.0)
    adam_epsilon: float = _key(1e-8, low=0.0, low_open=True)
    optim: str = _key("adamw_torch")
    num_train_epochs: float = _key(3.0, low=0.0, low_open=True)
    max_steps: int = _key(-1)
    ppo_epochs: int = _key(4, low=1)
    ppo_target: Optional[float] = _key(None, low=0.0, low_open=True)
    ppo_score_norm: bool = _key(False)
    ppo_whiten_rewards: Optional[bool] = _key(None)
    preset: Optional[str] = _key(None, choices=tuple(PRESETS))
    kl_coef: Optional[float] = _key(None, low=0.0)
    adap_kl_ctrl: Optional[bool] = _key(None)
    horizon: Optional[float] = _key(None, low=0.0, low_open=True)
    kl_estimator: Optional[str] = _key(None, choices=KL_ESTIMATORS)
    cliprange: Optional[float] = _key(None, low=0.0, low_open=True)
    cliprange_value: Optional[float] = _key(None, low=0.0, low_open=True)
    vf_coef: Optional[float] = _key(None, low=0.0)
    gamma: Optional[float] = _key(None, low=0.0, high=1.0)
    lam: Optional[float] = _key(None, low=0.0, high=1.0)
    missing_eos_penalty: Optional[float] = _key(None)
    entropy_coef: float = _key(0.0)
    target_kl: Optional[float] = _key(None, low=0.0, low_open=True)
    early_stop_kl: Optional[float] = _key(10.0, low=0.0, low_open=True)
    on_kl_exceeded: str = _key("rollback", choices=ON_KL_EXCEEDED)
    max_rollbacks: int = _key(3, low=0)
    rollback_lr_scale: float = _key(0.5, low=0.0, high=1.0, low_open=True)
    rollback_kl_coef_scale: float = _key(1.0, low=1.0)
    critic_mode: str = _key("separate", choices=CRITIC_MODES)
    value_head_bias: Optional[bool] = _key(None)
    old_logprobs: str = _key("score", choices=OLD_LOGPROBS)
    max_new_tokens: int = _key(1024, low=1)
    temperature: float = _key(1.0, low=0.0, low_open=True)
    logprob_temperature: Optional[float] = _key(None, low=0.0, low_open=True)
    top_p: float = _key(1.0, low=0.0, high=1.0, low_open=True)
    top_k: int = _key(0, low=0)
    repetition_penalty: float = _key(1.0, low=0.0, low_open=True)
    bf16: bool = _key(False)
    seed: int = _key(42)
    overwrite_output_dir: bool = _key(False)
    logging_steps: int = _key(10, low=1)
    save_steps: int = _key(500, low=1)
    max_to_keep: Optional[int] = _key(3, low=1)
    resume: Optional[bool] = _key(None)
    samples_every: int = _key(10, low=0)
    num_samples: int = _key(4, low=1)
    tensorboard: bool = _key(False)
    mesh: Optional[dict] = _key(None)
    distributed: Optional[Union[str, dict]] = _key(None)
    kl_rule: Optional[str] = _key(None, choices=KL_RULES)
    rm_max_length_diff: Optional[int] = _key(None, low=0)
    length_reward: Optional[str] = _key(None, choices=LENGTH_REWARDS)
    length_penalty: Optional[float] = _key(None, low=0.0)
    stages: Optional[tuple] = _key(None)
    # The keys the user gave (not a config key): an explicit null differs from "take the preset's value".
    given_keys: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)
    # LLaMA-Factory keys accepted without effect (INERT_KEYS); the command prints them once.
    ignored_keys: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def shared_value_head_bias(self) -> bool:
        """Whether the shared critic's value head has a bias (value_head_bias; null: preset llamafactory)."""
        if self.value_head_bias is not None:
            return self.value_head_bias
        return self.critic_mode == "shared" and self.preset == "llamafactory"

    @property
    def adapters_to_merge(self) -> tuple:
        """The adapter directories merged into the base weights (LLaMA-Factory: all but the resumed last one)."""
        if self.adapter_name_or_path is None:
            return ()
        return self.adapter_name_or_path if self.create_new_adapter else self.adapter_name_or_path[:-1]

    @property
    def adapter_to_resume(self) -> Optional[str]:
        """The adapter directory trained further (the last one, unless create_new_adapter)."""
        if self.adapter_name_or_path is None or self.create_new_adapter:
            return None
        return self.adapter_name_or_path[-1]

    def optimizer_options(self) -> dict:
        """The `ppojax.OptimizerConfig` fields these keys set (schedule and learning rate apart)."""
        return dict(
            max_grad_norm=self.max_grad_norm or None,
            b1=self.adam_beta1,
            b2=self.adam_beta2,
            eps=self.adam_epsilon,
            weight_decay=self.weight_decay,
        )

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up optimizer steps of a run of `total_steps`: warmup_steps, or ceil(warmup_ratio × total_steps)."""
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)

    # ---- derived values -------------------------------------------------------------------------------

    @property
    def micro_batch_size(self) -> int:
        """Rows per forward/backward pass."""
        return self.per_device_train_batch_size

    @property
    def optimizer_batch_size(self) -> int:
        """Rows per optimizer step (one PPO minibatch)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def rollout_batch_size(self) -> int:
        """Prompts per PPO iteration."""
        if self.batch_size is not None:
            return self.batch_size
        return self.optimizer_batch_size * (self.ppo_buffer_size or 1)

    @property
    def lora_scale_alpha(self) -> float:
        """The alpha whose alpha / rank is the LoRA scale: with use_rslora, alpha · √rank (scale alpha / √rank)."""
        alpha = float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank
        return alpha * math.sqrt(self.lora_rank) if self.use_rslora else alpha

    @property
    def raw_template(self) -> bool:
        """True when prompts are used as raw text (no chat template)."""
        return self.template.lower() in RAW_TEMPLATES

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")

    @property
    def convention(self) -> Convention:
        """The preset (or ppojax with LLaMA-Factory's KL defaults) with the explicit keys applied."""
        if self.preset is None:
            base = PRESETS["ppojax"].replace(kl_coef=0.2, adaptive_kl=True, kl_target=6.0, kl_horizon=10000.0)
        else:
            base = PRESETS[self.preset]
        changes = {
            field: getattr(self, key) for key, field in CONVENTION_KEYS.items() if getattr(self, key) is not None
        }
        if self.cliprange_value is None and "cliprange_value" in self.given_keys:
            changes["value_clip_eps"] = None  # an explicit null turns value clipping off
        return base.replace(**changes) if changes else base

    def to_dict(self) -> dict:
        """The config keys and values (JSON-able; tuples become lists)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @property
    def dataset_source(self):
        """What the data loaders read: the dataset file, or the LLaMA-Factory dataset_info.json entries that
        `dataset` names (`ppojax.dataset_info`)."""
        if os.path.isfile(self.dataset):
            return self.dataset
        from ppojax import dataset_info

        return dataset_info.resolve(self.dataset, self.dataset_dir)

    def hash(self) -> str:
        """A short hash of the settings that change the training trajectory (not logging / saving / resume).
        Keys added since 2026-11-22 are left out at their default (`HASH_NEUTRAL_AT_DEFAULT`), so a run
        checkpointed by an earlier ppojax still resumes after an upgrade."""
        relevant = {
            k: v
            for k, v in self.to_dict().items()
            if k not in _NON_TRAJECTORY_KEYS and not (k in HASH_NEUTRAL_AT_DEFAULT and v == _FIELDS[k].default)
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Config key -> Convention field (None in the config = take the preset's value).
CONVENTION_KEYS = {
    "kl_coef": "kl_coef",
    "adap_kl_ctrl": "adaptive_kl",
    "ppo_target": "kl_target",
    "horizon": "kl_horizon",
    "kl_estimator": "kl_estimator",
    "cliprange": "clip_eps",
    "cliprange_value": "value_clip_eps",
    "vf_coef": "vf_coef",
    "gamma": "gamma",
    "lam": "lam",
    "missing_eos_penalty": "missing_eos_penalty",
    "ppo_whiten_rewards": "whiten_rewards",
    "kl_rule": "kl_rule",
    "logprob_temperature": "logprob_temperature",
    "length_reward": "length_reward",
    "length_penalty": "length_penalty",
}

# Other names for the same key (TRL 0.x / OpenRLHF / HF Trainer spellings).
ALIASES = {
    "init_kl_coef": "kl_coef",
    "kl_target": "ppo_target",
    "target": "ppo_target",
    "whiten_rewards": "ppo_whiten_rewards",
    "mini_batch_size": "per_device_train_batch_size",
    "save_total_limit": "max_to_keep",
    "resume_from_checkpoint": "resume",
}

# Well-known keys of other tools that ppojax does not take, with what to do instead.
FOREIGN_KEYS = {
    "fp16": "fp16 is not supported; use bf16: true",
    "kl_penalty": "use kl_estimator: k1 | k2 | k3 | abs (TRL's kl = k1, mse = k2, abs = abs; 'full' is not offered)",
    "early_stopping": "set target_kl to enable TRL-style early stopping of the PPO epochs",
    "use_score_norm": "use ppo_score_norm: true",
    "use_score_scaling": "use ppo_score_norm: true",
    **{
        key: "ppojax does not quantize models (bf16: true halves every model's memory; QLoRA is not offered); remove it"
        for key in ("quantization_bit", "ref_model_quantization_bit", "reward_model_quantization_bit")
    },
    "deepspeed": "ppojax shards with the mesh key instead: mesh: {fsdp: -1} is ZeRO-3 over every device (README, "
    "Many devices and hosts); remove deepspeed",
    **{
        key: "ppojax train does not evaluate during training; score held-out data afterwards with ppojax eval-rm "
        "(reward models) or ppojax generate"
        for key in ("do_eval", "eval_dataset", "val_size", "eval_strategy", "eval_steps", "per_device_eval_batch_size")
    },
}

# LLaMA-Factory keys accepted at one value only (its default, which is what ppojax does), with why not another.
DEFAULT_ONLY_KEYS = {
    "do_sample": (True, "PPO samples its responses (greedy rollouts are not offered; temperature sets the sampling)"),
    "num_beams": (1, "ppojax samples one response per prompt; beam search is not offered"),
    "skip_special_tokens": (True, "samples.jsonl responses are always decoded without special tokens"),
    "lora_dropout": (0.0, "ppojax uses no dropout anywhere (PPO_DETAILS item 4)"),
    "use_dora": (False, "DoRA is not offered (plain LoRA, or use_rslora)"),
    "packing": (False, "ppojax pads each batch to a bucket width; sequence packing is not offered"),
    "neat_packing": (False, "ppojax pads each batch to a bucket width; sequence packing is not offered"),
    "train_on_prompt": (False, "the sft loss is on the response tokens only"),
    "use_fast_tokenizer": (True, "ppojax loads the tokenizer with transformers' AutoTokenizer defaults (fast)"),
}

# LLaMA-Factory keys that mean nothing here: accepted, reported once by `ppojax train`, otherwise ignored.
INERT_KEYS = {
    "trust_remote_code": "ppojax implements each supported architecture itself and never runs a checkpoint's code",
    "overwrite_cache": "ppojax keeps no dataset cache",
    "preprocessing_num_workers": "tokenisation runs in the main process",
    "dataloader_num_workers": "there is no data loader process pool",
    "ddp_timeout": "multi-process runs use jax.distributed (the mesh and distributed keys)",
    "plot_loss": "training_curves.png is always written",
    "flash_attn": "attention is XLA's",
    "report_to": "metrics CSV, summary.json and plots are always written (tensorboard: true adds event files)",
    "save_only_model": "checkpoints always hold the whole train state (so a run resumes); the model is exported apart",
    "enable_liger_kernel": "the kernels are XLA's",
    "use_unsloth": "the kernels are XLA's",
    "use_unsloth_gc": "the kernels are XLA's",
    "low_cpu_mem_usage": "weights are read from safetensors straight into place",
    "cache_dir": "nothing is downloaded: models and data are local paths",
    "preprocessing_batch_size": "tokenisation runs in the main process",
    "disable_gradient_checkpointing": "gradient checkpointing changes memory, not results; ppojax's memory estimate "
    "is printed before a run",
}

_NON_TRAJECTORY_KEYS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "mesh",
        "distributed",
        "logging_steps",
        "save_steps",
        "max_to_keep",
        "resume",
        "samples_every",
        "num_samples",
        "tensorboard",
        "do_train",
        "optim",  # every accepted name is the same update rule
    }
)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in ("given_keys", "ignored_keys")}

# Keys added after 2026-11-22 (ppojax 20ef444), each with a default that reproduces the earlier behaviour: at that
# default they stay out of the config hash, so checkpoints of earlier runs keep matching. Add every new key here
# (tests/test_config.py lists the keys of 20ef444 and fails on a key that is in neither).
HASH_NEUTRAL_AT_DEFAULT = frozenset(
    {
        "repetition_penalty",
        "ref_model_adapters",
        "reward_model_adapters",
        "default_system",
        "enable_thinking",
        "use_rslora",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "optim",
    }
)
_REQUIRED = tuple(name for name, f in _FIELDS.items() if f.default is dataclasses.MISSING)
_HINTS = typing.get_type_hints(TrainConfig)


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML file, applies `key=value` overrides (values parsed as YAML scalars) and validates."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, found a {type(raw).__name__}")
    sources = {_canonical(k, path): path for k in raw}
    merged = _canonical_keys(raw, path)
    for key, value in parse_overrides(overrides).items():
        merged[key] = value
        sources[key] = "command line"
    return config_from_dict(merged, source=path, sources=sources)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """["lr=1e-6", "bf16=true"] -> {key: value}, values parsed as YAML scalars; aliases resolved."""
    out = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"command line: override {item!r} is not key=value (e.g. learning_rate=1.0e-6)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _merge_key(out, _canonical(key, "command line"), value, "command line", key)
    return out


def config_from_dict(
    raw: Mapping[str, Any], *, source: str = "config", sources: Optional[Mapping] = None
) -> TrainConfig:
    """Validates a mapping (aliases allowed) into a `TrainConfig`. `source` names it in error messages."""
    raw = _canonical_keys(raw, source)
    where = lambda key: (sources or {}).get(key, source)  # noqa: E731
    report_to = raw.get("report_to")
    if report_to not in (None, "none", "None", [], ["none"]):
        raise ConfigError(
            f"{where('report_to')}: 'report_to' is {report_to!r}; ppojax reports to files only: metrics CSV, summary.json "
            "and plots are always written, tensorboard: true adds TensorBoard event files (use report_to: none)"
        )
    for key, (expected, why) in DEFAULT_ONLY_KEYS.items():
        if key in raw and (raw[key] != expected or isinstance(raw[key], bool) != isinstance(expected, bool)):
            raise ConfigError(f"{where(key)}: '{key}' is {raw[key]!r}; only {expected!r} is accepted: {why}")
    ignored = tuple(sorted(key for key in raw if key in INERT_KEYS or key in DEFAULT_ONLY_KEYS))
    raw = {key: value for key, value in raw.items() if key not in INERT_KEYS and key not in DEFAULT_ONLY_KEYS}
    values = {}
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise ConfigError(f"{source}: missing required key '{key}' ({_required_hint(key)})")
    for key, value in raw.items():
        values[key] = _check_value(key, value, where(key), raw)
    config = TrainConfig(**values, given_keys=frozenset(raw), ignored_keys=ignored)
    _check_consistency(config, raw, where)
    return config


def _canonical(key: str, source: str) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"{source}: key {key!r} is not a string")
    key = ALIASES.get(key, key)
    if key in _FIELDS or key in INERT_KEYS or key in DEFAULT_ONLY_KEYS:
        return key
    if key in FOREIGN_KEYS:
        raise ConfigError(f"{source}: key '{key}' is not a ppojax key: {FOREIGN_KEYS[key]}")
    candidates = list(_FIELDS) + list(ALIASES)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see the key table in ppojax/config.py"
    raise ConfigError(f"{source}: unknown key '{key}'; {hint}")


def _merge_key(out: dict, key: str, value, source: str, given_as: str):
    if key in out and out[key] != value:
        raise ConfigError(
            f"{source}: '{given_as}' ({value!r}) and another spelling of '{key}' ({out[key]!r}) are both set; keep one"
        )
    out[key] = value


def _canonical_keys(raw: Mapping, source: str) -> dict:
    out: dict = {}
    for key, value in raw.items():
        _merge_key(out, _canonical(key, source), value, source, key)
    return out


def _required_hint(key: str) -> str:
    return {
        "model_name_or_path": "a local Hugging Face model directory",
        "stage": f"one of {', '.join(STAGES)}",
        "dataset": "a local .json or .jsonl file",
        "output_dir": "where models, checkpoints and reports go",
    }[key]


# ----------------------------------------------------------------------------------------------------------
# Type, range and path checks


def _type_name(tp) -> str:
    return {bool: "a boolean (true / false)", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _check_value(key: str, value, source: str, raw: Mapping):
    field = _FIELDS[key]
    meta = field.metadata
    hint = _HINTS[key]
    optional = typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' must not be null; default is {field.default!r}")
    if key == "lora_target":
        return _lora_target(value, source)
    if key in ("adapter_name_or_path", "ref_model_adapters", "reward_model_adapters"):
        return _adapter_paths(key, value, source, raw)
    if key in ("mesh", "distributed"):
        return _parallel_key(key, value, source)
    if key == "stages":
        return _stages(value, source, raw)
    if key == "optim":
        return _optim(value, source)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    value = _coerce(key, value, base, source)
    if meta["choices"] is not None and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        maybe = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: '{key}' is {value!r}; allowed: {', '.join(map(str, meta['choices']))}{maybe}")
    if base in (int, float):
        _check_range(key, value, meta, source)
    if meta["path"] is not None:
        value = _check_path(key, value, meta["path"], source, raw)
    return value


def _optim(value, source: str) -> str:
    if value not in ADAMW_NAMES:
        raise ConfigError(
            f"{source}: 'optim' is {value!r}; ppojax's optimizer is PyTorch's AdamW (weight_decay, adam_beta1, "
            f"adam_beta2, adam_epsilon set it), which these names select: {', '.join(ADAMW_NAMES)}"
        )
    return value


def _coerce(key: str, value, base, source: str):
    bad = ConfigError(f"{source}: '{key}' is {value!r} ({type(value).__name__}); expected {_type_name(base)}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):  # YAML yes/no/true must not pass as 1/0
        raise bad
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if base is float:
        if isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' is {value!r}; expected a finite number")
        return value
    if base is str:
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' is empty; expected {_type_name(str)}")
        raise bad
    raise bad


def _check_range(key: str, value, meta, source: str):
    low, high = meta["low"], meta["high"]
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if meta["low_open"] else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{source}: '{key}' is {value!r}; must be {allowed}")


def _check_path(key: str, value: str, kind: str, source: str, raw: Mapping) -> str:
    base = raw.get("dataset_dir") if key == "dataset" and raw.get("dataset_dir") else os.getcwd()
    path = os.path.abspath(os.path.join(os.path.expanduser(base), os.path.expanduser(value)))
    if kind == "adapter":
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ConfigError(
                f"{source}: '{key}' has {value!r} but {path} has no adapter_config.json (expected a local PEFT LoRA "
                "adapter directory, e.g. a LLaMA-Factory LoRA output_dir)"
            )
    elif kind == "dir":
        if not os.path.isdir(path):
            raise ConfigError(f"{source}: '{key}' is {value!r} but {path} is not a directory{_dir_hint(key)}")
        adapter = key == "reward_model" and os.path.isfile(os.path.join(path, "adapter_config.json"))
        if key != "dataset_dir" and not adapter and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"{source}: '{key}' is {value!r} but {path} has no config.json "
                "(expected a local Hugging Face model directory; hub names are not downloaded)"
            )
    elif not os.path.isfile(path):
        from ppojax import dataset_info

        info = dataset_info.info_path(raw.get("dataset_dir"))
        if key == "dataset" and os.path.isfile(info):  # LLaMA-Factory dataset names
            dataset_info.resolve(value, raw.get("dataset_dir"), source)
            return ",".join(dataset_info.split_names(value))
        raise ConfigError(
            f"{source}: '{key}' is {value!r} but {path} is not a file, and there is no {info} to look it up in "
            "(ppojax reads a local .json / .jsonl file, or LLaMA-Factory dataset names in dataset_dir's dataset_info.json)"
        )
    return path


def _dir_hint(key: str) -> str:
    if key == "reward_model":
        return " (train one first with stage: rm and point reward_model at its output_dir)"
    if key in ("model_name_or_path", "ref_model"):
        return " (a local Hugging Face directory; hub names are not downloaded)"
    return ""


def _parallel_key(key: str, value, source: str):
    """mesh -> {data, fsdp, tensor} sizes (-1 kept); distributed -> "auto" or a dict of jax.distributed keys."""
    from ppojax import parallel

    try:
        if key == "mesh":
            mesh = parallel.MeshConfig.from_dict(value, "mesh")
            return {axis: getattr(mesh, axis) for axis in parallel.MESH_AXES}
        if value is True or value == "auto":
            return "auto"
        if not isinstance(value, Mapping):
            raise ValueError(f"distributed: expected auto or a mapping of {parallel.DISTRIBUTED_KEYS}, found {value!r}")
        unknown = sorted(set(value) - set(parallel.DISTRIBUTED_KEYS))
        if unknown:
            raise ValueError(f"distributed.{unknown[0]} is not a key; the keys are {parallel.DISTRIBUTED_KEYS}")
        return dict(value)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def _adapter_paths(key: str, value, source: str, raw: Mapping) -> tuple:
    """A comma list (or YAML list) of PEFT adapter directories -> absolute paths, each with adapter_config.json."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: '{key}' is {value!r}; expected a comma list of adapter directories")
    paths = [_check_path(key, name, "adapter", source, raw) for name in (n.strip() for n in names) if name]
    if not paths:
        raise ConfigError(f"{source}: '{key}' is empty")
    return tuple(paths)


def _lora_target(value, source: str):
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{source}: 'lora_target' is {value!r}; expected 'all' or a comma list of {', '.join(LORA_TARGETS)}"
        )
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return "all"
    out = []
    for name in names:
        ours = _HF_LORA_NAMES.get(name, name)
        if ours not in LORA_TARGETS:
            raise ConfigError(
                f"{source}: 'lora_target' has {name!r}; allowed: all, {', '.join(LORA_TARGETS)} "
                "(or the HF names q_proj ... down_proj)"
            )
        if ours not in out:
            out.append(ours)
    if not out:
        raise ConfigError(f"{source}: 'lora_target' is empty; use 'all' or a comma list of {', '.join(LORA_TARGETS)}")
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Cross-key consistency


def _check_consistency(config: TrainConfig, raw: Mapping, where):
    c = config
    if not c.do_train:
        raise ConfigError(f"{where('do_train')}: 'do_train' is false; ppojax train only trains (set do_train: true)")
    for key in ("adam_beta1", "adam_beta2"):
        if getattr(c, key) >= 1.0:
            raise ConfigError(f"{where(key)}: '{key}' is {getattr(c, key)!r}; must be < 1 (Adam's moment decay)")
    if c.value_head_bias is not None and c.critic_mode != "shared":
        raise ConfigError(
            f"{where('value_head_bias')}: 'value_head_bias' is for critic_mode: shared (a separate or joint critic's "
            "head is the reward model's, with or without its bias)"
        )
    if c.adapter_name_or_path is not None and c.finetuning_type != "lora":
        raise ConfigError(
            f"{where('adapter_name_or_path')}: 'adapter_name_or_path' needs finetuning_type: lora (as in "
            "LLaMA-Factory); to fully fine-tune an adapted model, merge the adapter into it first"
        )
    if c.create_new_adapter and c.adapter_name_or_path is None:
        raise ConfigError(f"{where('create_new_adapter')}: 'create_new_adapter' needs 'adapter_name_or_path'")
    if c.warmup_ratio is not None and "warmup_steps" in raw:
        raise ConfigError(f"{where('warmup_ratio')}: set 'warmup_steps' or 'warmup_ratio', not both")
    if c.warmup_ratio is not None and c.warmup_ratio >= 1.0:
        raise ConfigError(
            f"{where('warmup_ratio')}: 'warmup_ratio' is {c.warmup_ratio}; must be < 1 (a fraction of the run)"
        )
    if c.default_system and c.template.lower() in RAW_TEMPLATES:
        raise ConfigError(
            f"{where('default_system')}: 'default_system' needs a chat template, but template is {c.template!r} (raw "
            "text has no system turn); set template to the model's (e.g. qwen) or remove default_system"
        )
    if c.ref_model_adapters is not None and c.ref_model is None:
        raise ConfigError(
            f"{where('ref_model_adapters')}: 'ref_model_adapters' needs 'ref_model' (the model they are merged into); "
            "without ref_model the reference is the initial policy"
        )
    if c.reward_model_adapters is not None and c.reward_model is not None:
        if os.path.isfile(os.path.join(c.reward_model, "adapter_config.json")) or c.reward_model_type == "lora":
            raise ConfigError(
                f"{where('reward_model_adapters')}: 'reward_model_adapters' applies to a full reward_model "
                f"(reward_model_type: full, as in LLaMA-Factory); {c.reward_model} is a LoRA adapter"
            )
        head = os.path.join(c.reward_model_adapters[-1], "value_head.safetensors")
        if not os.path.isfile(head):
            raise ConfigError(
                f"{where('reward_model_adapters')}: the last of 'reward_model_adapters' must be a LLaMA-Factory LoRA "
                f"reward model (LLaMA-Factory reads the value head from it), but {head} does not exist"
            )
    if c.stage == "ppo" and c.reward_model is None:
        raise ConfigError(f"{where('stage')}: stage ppo needs 'reward_model' (the output_dir of a stage: rm run)")
    if c.reward_model_type is not None and c.reward_model is not None:
        is_adapter = os.path.isfile(os.path.join(c.reward_model, "adapter_config.json"))
        if (c.reward_model_type == "lora") != is_adapter:
            found = "a LoRA adapter (adapter_config.json)" if is_adapter else "no adapter_config.json (a full model)"
            raise ConfigError(
                f"{where('reward_model_type')}: 'reward_model_type' is {c.reward_model_type!r} but reward_model "
                f"{c.reward_model} holds {found}; remove the key (ppojax reads either) or fix it"
            )
    step = c.optimizer_batch_size
    product = (
        f"per_device_train_batch_size × gradient_accumulation_steps = {c.per_device_train_batch_size} × "
        f"{c.gradient_accumulation_steps} = {step} rows per optimizer step"
    )
    if c.batch_size is not None:
        if c.batch_size % step:
            lower = max(step, c.batch_size // step * step)
            raise ConfigError(
                f"{where('batch_size')}: 'batch_size' {c.batch_size} (prompts per PPO iteration) is not divisible by "
                f"{product}; use a multiple of {step}, e.g. {lower} or {lower + step}"
            )
        if c.ppo_buffer_size is not None and c.batch_size != step * c.ppo_buffer_size:
            raise ConfigError(
                f"{where('batch_size')}: 'batch_size' {c.batch_size} disagrees with ppo_buffer_size {c.ppo_buffer_size} × "
                f"{step} ({product}) = {step * c.ppo_buffer_size}; set only one of batch_size and ppo_buffer_size"
            )
    if c.stage == "ppo":
        _check_ppo(c, where)
        mode = c.length_reward or "none"
        if (mode == "penalty") != bool(c.length_penalty):
            key = "length_penalty" if c.length_penalty else "length_reward"
            raise ConfigError(
                f"{where(key)}: length_reward {mode!r} with length_penalty {c.length_penalty or 0}; "
                "length_reward: penalty needs length_penalty > 0, and length_penalty needs length_reward: penalty"
            )
        if c.stages:
            _check_stages(c, where)
        conv = c.convention
        if c.ppo_target is not None and not conv.adaptive_kl:
            raise ConfigError(
                f"{where('ppo_target')}: 'ppo_target' {c.ppo_target} has no effect with a fixed KL coefficient "
                f"(preset {c.preset!r} has adap_kl_ctrl false); set adap_kl_ctrl: true or drop ppo_target"
            )
        if c.kl_rule is not None and not conv.adaptive_kl:
            raise ConfigError(
                f"{where('kl_rule')}: 'kl_rule' {c.kl_rule} has no effect with a fixed KL coefficient "
                f"(adap_kl_ctrl is false); set adap_kl_ctrl: true or drop kl_rule"
            )
    if c.stage != "ppo":
        ppo_only = sorted(k for k in raw if k in _PPO_ONLY_KEYS)
        if ppo_only:
            raise ConfigError(
                f"{where(ppo_only[0])}: '{ppo_only[0]}' is a PPO setting but stage is {c.stage!r}; "
                "remove it or set stage: ppo"
            )
    if c.rm_max_length_diff is not None and c.stage != "rm":
        raise ConfigError(
            f"{where('rm_max_length_diff')}: 'rm_max_length_diff' filters reward-model pairs but stage is "
            f"{c.stage!r}; remove it or set stage: rm"
        )
    lora_keys = ("lora_rank", "lora_alpha", "lora_target", "use_rslora")
    if c.finetuning_type == "full" and any(k in raw for k in lora_keys):
        key = next(k for k in lora_keys if k in raw)
        raise ConfigError(
            f"{where(key)}: '{key}' is set but finetuning_type is 'full'; set finetuning_type: lora or remove it"
        )


def _check_ppo(c: TrainConfig, where):
    """stage: ppo settings that the PPO runner cannot honour."""
    scored_at = c.logprob_temperature  # the convention's, without building it (its own checks come later)
    if scored_at is None and c.preset is not None:
        scored_at = PRESETS[c.preset].logprob_temperature
    if c.old_logprobs == "rollout" and scored_at is not None and scored_at != c.temperature:
        key = "logprob_temperature" if c.logprob_temperature is not None else "preset"
        raise ConfigError(
            f"{where(key)}: old_logprobs: rollout reuses the log-probs sampled at temperature {c.temperature}, but "
            f"the log-probs are scored at {scored_at} ({key}); use old_logprobs: score"
        )
    if c.critic_mode != "separate" and c.critic_learning_rate is not None:
        raise ConfigError(
            f"{where('critic_learning_rate')}: 'critic_learning_rate' has no effect with critic_mode {c.critic_mode} "
            "(one optimizer at learning_rate); remove it or set critic_mode: separate"
        )


_PPO_ONLY_KEYS = frozenset(
    {
        "reward_model",
        "reward_model_type",
        "ref_model",
        "ref_model_adapters",
        "reward_model_adapters",
        "repetition_penalty",
        "ppo_buffer_size",
        "batch_size",
        "ppo_epochs",
        "ppo_target",
        "ppo_score_norm",
        "ppo_whiten_rewards",
        "preset",
        "kl_coef",
        "adap_kl_ctrl",
        "horizon",
        "kl_estimator",
        "cliprange",
        "cliprange_value",
        "vf_coef",
        "gamma",
        "lam",
        "missing_eos_penalty",
        "target_kl",
        "early_stop_kl",
        "on_kl_exceeded",
        "max_rollbacks",
        "rollback_lr_scale",
        "rollback_kl_coef_scale",
        "critic_mode",
        "value_head_bias",
        "old_logprobs",
        "logprob_temperature",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "max_prompt_length",
        "prompt_overflow",
        "critic_learning_rate",
        "samples_every",
        "num_samples",
        "entropy_coef",
        "kl_rule",
        "length_reward",
        "length_penalty",
        "stages",
    }
)


# ----------------------------------------------------------------------------------------------------------
# Staged training (issue 10): e.g. a cautious warm-up, the main phase, a cautious finish, in one run.

STAGE_OVERRIDES = (
    "learning_rate",
    "critic_learning_rate",
    "cliprange",
    "cliprange_value",
    "kl_coef",
    "ppo_target",
    "ppo_epochs",
    "entropy_coef",
    "vf_coef",
    "target_kl",
)


@dataclasses.dataclass(frozen=True)
class TrainingStage:
    """One entry of `stages`: `iterations` PPO iterations with `overrides` ((key, value) pairs, validated)."""

    name: str
    iterations: int
    overrides: tuple = ()


def _stages(value, source: str, raw: Mapping) -> tuple:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{source}: 'stages' must be a non-empty list of {{iterations: N, <overrides>}} mappings")
    out = []
    for i, entry in enumerate(value):
        where = f"{source}: stages[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{where} is {entry!r}; expected a mapping such as {{iterations: 500, learning_rate: 5e-7}}"
            )
        entry = dict(entry)
        name = str(entry.pop("name", f"stage {i + 1}"))
        iterations = entry.pop("iterations", None)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"{where}: 'iterations' is {iterations!r}; expected an integer >= 1")
        nested = entry.pop("overrides", {})
        if not isinstance(nested, Mapping):
            raise ConfigError(f"{where}: 'overrides' must be a mapping of key: value")
        overrides = {}
        for key, item in {**entry, **nested}.items():
            canonical = _canonical(key, f"{where}")
            if canonical not in STAGE_OVERRIDES:
                raise ConfigError(
                    f"{where}: '{key}' cannot change between stages; allowed: {', '.join(STAGE_OVERRIDES)}"
                )
            overrides[canonical] = _check_value(canonical, item, where, raw)
        out.append(TrainingStage(name, iterations, tuple(sorted(overrides.items()))))
    return tuple(out)


def stage_config(config: TrainConfig, index: int) -> TrainConfig:
    """The run's config with stage `index`'s overrides applied (the config itself when there are no stages)."""
    if not config.stages:
        return config
    overrides = dict(config.stages[index].overrides)
    return config.replace(**overrides, given_keys=config.given_keys | frozenset(overrides))


def stage_starts(config: TrainConfig) -> tuple:
    """The 1-based iteration at which each stage begins: (1, 1 + n_1, 1 + n_1 + n_2, ...)."""
    starts, first = [], 1
    for stage in config.stages or ():
        starts.append(first)
        first += stage.iterations
    return tuple(starts)


def stage_at(config: TrainConfig, iteration: int) -> int:
    """The index of the stage that runs 1-based `iteration` (the last stage past the end; 0 without stages)."""
    index = 0
    for i, start in enumerate(stage_starts(config)):
        if iteration >= start:
            index = i
    return index


def _check_stages(c: TrainConfig, where) -> None:
    total = sum(stage.iterations for stage in c.stages)
    if c.max_steps > 0 and c.max_steps != total:
        raise ConfigError(
            f"{where('max_steps')}: 'max_steps' {c.max_steps} differs from the stages' {total} iterations; "
            "drop max_steps (the stages set the length of the run) or make them agree"
        )
    for i, stage in enumerate(c.stages):
        staged = stage_config(c, i)
        try:
            conv = staged.convention
        except ValueError as e:
            raise ConfigError(f"{where('stages')}: stages[{i}] ({stage.name}): {e}") from None
        if staged.ppo_target is not None and not conv.adaptive_kl:
            raise ConfigError(
                f"{where('stages')}: stages[{i}] ({stage.name}) sets ppo_target but the KL coefficient is fixed; "
                "set adap_kl_ctrl: true"
            )
