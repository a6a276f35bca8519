"""`ppojax generate --model DIR --prompts FILE`: sample responses from any local HF causal-LM directory.

Prompts are read as for stage ppo (`ppojax.data.load_prompts`: alpaca instruction/input, prompt, or messages;
`template` none = raw text, any other name = the tokenizer's chat template). They are sampled in batches of
`batch_size` rows (the last batch is filled up with copies of its last prompt and those rows dropped, so every
batch has one shape) with `ppojax.rollout`; batch i uses the key fold_in(PRNGKey(seed), i), so a run is
reproducible. Temperature 0 is greedy.

`mesh` ({data, fsdp, tensor} sizes, as the train config's key) samples on a device mesh with
`parallel.sharded_rollout`: the weights are read straight into their shards and each batch is split over
data x fsdp (`batch_size` must be a multiple); the `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` /
`JAX_PROCESS_ID` variables start a multi-host run, each process feeding its rows (every process yields every
row; the command writes on process 0 only).
"""

from __future__ import annotations

import math
import os
from typing import Iterator, Mapping, Optional

import jax
import jax.numpy as jnp

from ppojax import data as data_lib
from ppojax import dataset_info
from ppojax import parallel
from ppojax.config import ConfigError
from ppojax.generation import bucket_length, pad_prompts, rollout_jit
from ppojax.models import CheckpointError, load_pretrained
from ppojax.runner import fit_vocabulary
from ppojax.runner_ppo import stop_token_ids


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"command line: '{name}' is {value!r}; must be {allowed}")


def generate(
    model_dir: str,
    prompts_path: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    template: str = "none",
    default_system: Optional[str] = None,
    enable_thinking: Optional[bool] = None,
    dataset_dir: Optional[str] = None,
    max_prompt_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    bf16: bool = False,
    mesh: Optional[Mapping] = None,
) -> Iterator[dict]:
    """Yields {"prompt", "response", "tokens", "stopped", "source"} per prompt, in file order."""
    _check("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, ">= 1")
    _check("--temperature", temperature, temperature >= 0, ">= 0 (0 is greedy)")
    _check("--top-p", top_p, 0 < top_p <= 1, "> 0 and <= 1")
    _check("--top-k", top_k, top_k >= 0, ">= 0 (0 is off)")
    _check(
        "--repetition-penalty",
        repetition_penalty,
        math.isfinite(repetition_penalty) and repetition_penalty > 0,
        "> 0 (1 is off)",
    )
    _check("--batch-size", batch_size, batch_size >= 1, ">= 1")
    _check("--max-prompt-length", max_prompt_length, max_prompt_length >= 1, ">= 1")
    layout = None
    if mesh is not None:  # jax.distributed (from the environment) and the mesh before any other JAX work
        try:
            layout, _ = parallel.setup(mesh, None, source="--mesh")
        except ValueError as e:
            message = str(e)
            raise ConfigError(message if message.startswith("--mesh") else f"--mesh: {message}") from None
        split = layout.batch_shards
        _check("--batch-size", batch_size, batch_size % split == 0, f"a multiple of data x fsdp = {split} on --mesh")
    tokenizer, _ = data_lib.ensure_pad_token(data_lib.load_tokenizer(model_dir))
    source = prompts_path
    if not os.path.isfile(prompts_path) and os.path.isfile(dataset_info.info_path(dataset_dir)):
        source = dataset_info.resolve(prompts_path, dataset_dir, "--prompts")  # LLaMA-Factory dataset names
    dataset = data_lib.load_prompts(
        source,
        tokenizer,
        template=template,
        max_prompt_length=max_prompt_length,
        default_system=default_system,
        enable_thinking=enable_thinking,
    )
    try:
        shardings = None if layout is None else (lambda model: layout.params(model.param_shapes()))
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        model, params = load_pretrained(model_dir, head="lm", dtype=dtype, shardings=shardings)
    except CheckpointError as e:
        raise ConfigError(f"--model {model_dir}: {e}") from None
    model, params = fit_vocabulary(model, params, tokenizer)
    if layout is not None:  # again: a vocabulary resize makes new arrays
        params = parallel.place(params, layout.params(params))
        sharded = parallel.sharded_rollout(model, layout, max_new_tokens=max_new_tokens, top_k=top_k)
    bucket = min(64, max_prompt_length)
    needed = bucket_length(max(len(p) for p in dataset.prompts), bucket) + max_new_tokens
    if needed > model.config.max_position_embeddings:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} with prompts of up to {max(len(p) for p in dataset.prompts)} tokens "
            f"needs {needed} positions; {model_dir} has max_position_embeddings {model.config.max_position_embeddings}"
        )
    stops = stop_token_ids(tokenizer, model, model_dir)
    key = jax.random.PRNGKey(seed)
    sampling = dict(
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=stops,
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=repetition_penalty,
    )
    rows = len(dataset)
    for number, start in enumerate(range(0, rows, batch_size)):
        chunk = list(dataset.prompts[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        ids, mask = pad_prompts(chunk, tokenizer.pad_token_id, bucket=bucket)
        if layout is None:
            out = rollout_jit(
                model,
                params,
                ids,
                mask,
                jax.random.fold_in(key, number),
                max_new_tokens=max_new_tokens,
                top_k=top_k,
                **sampling,
            )
        else:
            batch = parallel.feed_batch(layout, (ids, mask))
            out = sharded(params, *batch, jax.random.fold_in(key, number), **sampling)
        response_ids, lengths, stopped = parallel.to_host((out.response_ids, out.lengths, out.stopped))
        for row in range(real):
            yield {
                "prompt": tokenizer.decode(list(chunk[row]), skip_special_tokens=False),
                "response": tokenizer.decode(response_ids[row, : lengths[row]].tolist(), skip_special_tokens=True),
                "tokens": int(lengths[row]),
                "stopped": bool(stopped[row]),
                "source": dataset.sources[start + row],
            }
