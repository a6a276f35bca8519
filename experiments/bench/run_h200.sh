#!/usr/bin/env bash
# The H200 benchmark (issue 9), written to be one `run` of the device tool (10 minutes at most):
#
#   ppojax and TRL 1.12 on a Qwen2.5-0.5B-shaped policy, critic (from the reward model) and reward model with
#   random weights, bf16, 256 prompts of 128 tokens, 256 new tokens, 4 PPO epochs × 4 minibatches; prints
#   seconds per PPO iteration split into generate / score / train, decode tokens/s against the measured HBM
#   bandwidth roofline, and the train phase's MFU against the measured bf16 matmul peak (8192³).
#
# The device image has torch, JAX (CUDA), transformers, accelerate, flax, optax, chex and orbax, but not trl,
# datasets, dill or multiprocess. Before the call, from the repository root on the CPU machine:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# then run with carry [".whl"]:  bash experiments/bench/run_h200.sh
# Results land in $OUT (h200.json, h200.log). Not run yet: no GPU was lent to the session that wrote this.
# A second, short call settles how top-k / top-p should find their cut-offs on the GPU (bisection, as on CPU,
# against sorting; `ppojax.sampling._search_thresholds`):
#   python3 experiments/bench/bench_sampling.py --batch 256 --vocab 151936 --steps 32
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, torch, transformers, trl; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)" | tee -a "$OUT/gpu.txt"
python3 experiments/bench/bench_ppo.py --workload h200 --minibatches "${MINIBATCHES:-4}" --updates "${UPDATES:-3}" \
  --warmup 1 --trl-python python3 --peak-size 8192 --bandwidth-mb 4096 --no-jemalloc --json "$OUT/h200.json" \
  2>&1 | tee "$OUT/h200.log"
