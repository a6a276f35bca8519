import os

# Sharding tests use fake CPU devices; harmless for the rest (must be set before jax is imported).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite is a CPU suite (parallel workers must not each grab an accelerator); override to test on one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

# Every new shape is a new XLA compilation under the jit variant: no deadline, modest example counts.
settings.register_profile(
    "ppojax",
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ppojax"))
