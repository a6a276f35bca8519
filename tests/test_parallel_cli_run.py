"""`ppojax train` stage ppo with `mesh:` on 8 fake CPU devices gives the one-device run's metrics."""

import numpy as np
import pytest

from ppojax.reports import read_metrics_csv
from tests.test_cli_ppo import PPO_OVERRIDES, ppo_run, ppo_yaml, reward_dir, run_cli, workdir  # noqa: F401


@pytest.mark.slow  # two end-to-end PPO runs of the example YAML (one shared with test_cli_ppo when run together)
def test_ppo_stage_on_a_mesh_matches_one_device(workdir, ppo_run):  # noqa: F811
    single_dir, _ = ppo_run
    # Rollout batch 2 x 2 x 2 = 8 prompts over data 2 x fsdp 4 (the 8 devices); micro-batches of 2 rows.
    result = run_cli(
        workdir, "train", ppo_yaml(workdir, "saves/ppo_mesh"), "--no-progress", *PPO_OVERRIDES, "mesh={fsdp: 4}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory estimate per device (mesh data=2, fsdp=4, tensor=1" in result.stderr
    sharded = read_metrics_csv(str(workdir / "saves" / "ppo_mesh" / "ppo_metrics" / "training_metrics.csv"))
    single = read_metrics_csv(str(single_dir / "ppo_metrics" / "training_metrics.csv"))
    # The example YAML trains in bf16 (8-bit mantissa: ~4e-3 relative per rounding), and the sharded program
    # sums in another order, so values agree to bf16 precision, not float32's: measured here scores within
    # 1.2e-3 relative, KL within 6e-4 absolute. The sampled responses are the same (equal lengths); a wrong
    # shard would change scores by O(0.1) and the lengths.
    assert len(sharded) == len(single) == 5
    for a, b in zip(sharded, single):
        assert a["response/length_mean"] == b["response/length_mean"]
        np.testing.assert_allclose(a["objective/scores"], b["objective/scores"], rtol=1e-2)
        # The loss is a sum of terms of both signs: 8e-3 relative measured at iteration 2.
        np.testing.assert_allclose(a["loss/total"], b["loss/total"], rtol=3e-2)
        for name in ("objective/kl", "policy/approxkl"):
            np.testing.assert_allclose(a[name], b[name], atol=2e-3, err_msg=name)
