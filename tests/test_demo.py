import numpy as np
import pytest

from ppojax import cli, demo


@pytest.mark.parametrize("preset", ["ppojax", "trl", "openrlhf", "verl", "openai"])
def test_demo_learns_under_every_preset(preset):
    history = demo.run(demo.DemoConfig(preset=preset), iterations=12, seed=1, log=None)
    scores = np.array([h["score"] for h in history])
    # The reward (target-token count + stop bonus) rises well above its starting value...
    assert scores[-5:].mean() > scores[0] + 0.25, scores
    # ...the PPO ratio is exactly 1 on the first minibatch of every iteration (no stale log-probs)...
    assert all(h["first_ratio_max"] == 1.0 for h in history)
    # ...and everything stays finite.
    assert all(np.isfinite(list(h.values())).all() for h in history)


def test_cli_demo_runs(capsys):
    assert cli.main(["demo", "--iterations", "3"]) == 0
    out = capsys.readouterr().out
    assert "iter   0" in out and "KL to reference" in out


def test_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--preset", "nope"])
    assert "unknown preset 'nope'" in capsys.readouterr().err
