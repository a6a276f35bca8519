"""The same jitted rollout with the batch split over two virtual CPU devices equals the single-device one.

XLA_FLAGS must be set before JAX starts, so the check runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fake_models import BagOfWordsLM
    from ppojax import generation as R

    assert len(jax.devices()) == 2, jax.devices()
    model = BagOfWordsLM()
    params = model.init(jax.random.key(0))
    ids, mask = R.pad_prompts([[3, 4, 5], [8, 9], [10, 11, 12, 13], [5], [6, 7], [1, 2, 3, 4, 5]], 16, bucket=8)
    ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])  # 12 rows, 6 per device
    run = lambda i, m: R.rollout_jit(model, params, i, m, jax.random.key(3), max_new_tokens=6, temperature=0.8,
                                     stop_token_ids=[2, 5], pad_token_id=16)
    single = run(ids, mask)
    rows = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    split = run(jax.device_put(ids, rows), jax.device_put(mask, rows))
    assert split.response_ids.sharding.spec == P("data"), split.response_ids.sharding
    assert np.any(single.stopped) and not np.all(single.stopped)
    for name in ("response_ids", "response_mask", "lengths", "stopped"):
        np.testing.assert_array_equal(getattr(split, name), getattr(single, name), err_msg=name)
    np.testing.assert_allclose(split.logprobs, single.logprobs, atol=1e-6)
    print("OK")
    """
)


@pytest.mark.slow  # a fresh interpreter and two compilations: ~10 s on the shared 2-core box
def test_batch_split_over_two_devices_equals_one_device():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
