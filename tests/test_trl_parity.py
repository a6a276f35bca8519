"""ppojax's `trl` preset against TRL 1.12's `PPOTrainer` itself: one update of each on identical data.

`experiments/bench/parity_trl.py` (its docstring has the method) on the benchmark's `tiny` workload: the same
prompts and responses, some rows stopping at an EOS (where TRL's value mask and score slot differ from the
response mask). TRL runs unmodified in a subprocess (`parity_trl_worker.py`); nothing of TRL is reimplemented
here, so this is the independent reference for the whole `score` → `train_on_batch` path of the preset.
The negative controls (one convention detail changed) show the comparison can tell a difference apart.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench"))
import parity_trl  # noqa: E402


def test_trl_preset_runs_trls_ppo_update(tmp_path):
    argv = ["--workload", "tiny", "--minibatches", "2", "--out", str(tmp_path), "--trl-python", sys.executable]
    r = parity_trl.main(argv)
    assert r["rows_stopped"] > 0 and r["ref_noise"] > 0
    assert abs(r["metrics"]["objective/kl"]["trl"]) > 1e-3  # the reference differs: the KL terms count
    # The same advantages, first-step gradients of every tensor, and update (4 AdamW steps in both).
    assert r["advantages_max_abs_diff"] < 1e-5 * r["advantages_abs_max"]
    for name in ("grad_policy", "grad_critic"):
        assert r[name]["worst"] < 1e-5, (name, r[name])
    for name in ("update_policy", "update_critic"):  # AdamW's early steps ≈ lr · sign(g): rounding can flip a sign
        assert r[name]["all"] < 2e-3, (name, r[name])
    g = r["grad_norms"]
    assert g["trl_steps"] == g["ppojax_steps"] == 4  # the tiny workload's 2 epochs × 2 minibatches
    assert r["trl_shuffles_replaced"] == 2  # TRL's minibatches are ppojax's rows, epoch by epoch
    np.testing.assert_allclose(g["ppojax_policy_mean"], g["trl_policy_mean"], rtol=1e-5)
    np.testing.assert_allclose(g["ppojax_critic_mean"], g["trl_value_mean"], rtol=1e-5)
    m = r["metrics"]
    for name in ("objective/scores", "objective/rlhf_reward", "loss/value_avg"):
        np.testing.assert_allclose(m[name]["ppojax"], m[name]["trl"], rtol=1e-5, atol=1e-7, err_msg=name)
    # The KL is a sum of differences of log-probs ~300× its size: compare it at float32's resolution of those terms
    # (an rtol of 1e-5 on the KL itself passed on an AVX2 box and failed by 4e-7 absolute on an AVX-512 one).
    assert abs(m["objective/kl"]["ppojax"] - m["objective/kl"]["trl"]) < r["kl_resolution"], (m["objective/kl"], r)
    # The policy loss of whitened advantages at ratio ≈ 1 is ≈ 0: compare on the advantages' scale.
    assert abs(m["loss/policy_avg"]["ppojax"] - m["loss/policy_avg"]["trl"]) < 1e-6
    for name in ("policy/clipfrac_avg", "val/clipfrac_avg"):
        assert abs(m[name]["ppojax"] - m[name]["trl"]) < 1e-6, name
    # Each changed detail moves the gradients far beyond the parity error.
    parity = max(r["grad_policy"]["all"], r["grad_critic"]["all"])
    for name, errors in r["controls"].items():
        assert max(errors.values()) > 1e3 * parity, (name, errors, parity)
