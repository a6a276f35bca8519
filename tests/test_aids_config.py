"""Config keys of the practitioner aids (issue 10): the KL step rule, RM length filtering, length-aware rewards."""

from ppojax.config import config_from_dict
from ppojax.train import kl_controller
from test_config import base, error, workdir  # noqa: F401  (workdir is a fixture)


def test_kl_rule_selects_the_step_controller(workdir):
    config = config_from_dict(base(kl_rule="step"))
    assert config.convention.kl_rule == "step" and config.convention.adaptive_kl
    controller = kl_controller(config.convention)
    state = controller.update(controller.init(), 100.0, 8)  # far above 1.5 × 6 nats
    assert abs(float(state.coef) - 0.2 * 1.5) < 1e-7
    assert config_from_dict(base()).convention.kl_rule == "proportional"


def test_kl_rule_errors(workdir):
    msg = error(config_from_dict, base(kl_rule="pid"))
    assert "'kl_rule'" in msg and "proportional, step" in msg
    # A fixed-β preset would ignore the rule: an error, not a silent no-op.
    msg = error(config_from_dict, base(preset="trl", kl_rule="step"))
    assert "'kl_rule'" in msg and "adap_kl_ctrl" in msg
    assert config_from_dict(base(preset="trl", kl_rule="step", adap_kl_ctrl=True)).convention.kl_rule == "step"
    msg = error(config_from_dict, base(stage="rm", kl_rule="step"))
    assert "PPO setting" in msg
