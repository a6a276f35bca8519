"""ppojax.memory: the trim after every XLA compilation."""

import jax
import jax.numpy as jnp

from ppojax import memory


def test_trim_runs_after_each_compilation_and_registers_once(monkeypatch):
    # The event names jax emits around a real compilation.
    seen = []

    def record(name, duration, **kwargs):
        seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        jax.jit(lambda x: x * 3 - 1)(jnp.arange(7.0)).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert memory.COMPILE_EVENT in seen
    # The listener trims on the compile event only, and is registered once however often it is asked for.
    monkeypatch.setattr(memory, "_trim", None)
    listeners, calls = [], []
    monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", listeners.append)
    assert memory.release_compiler_memory(trim=lambda: calls.append(1))
    assert memory.release_compiler_memory(trim=lambda: calls.append(2))
    assert len(listeners) == 1
    for name in seen:
        listeners[0](name, 0.1)
    assert calls == [1] * seen.count(memory.COMPILE_EVENT)


def test_glibc_trim_is_found_and_callable():
    trim = memory._malloc_trim()
    assert trim is not None  # the test machines run glibc
    assert trim() in (0, 1)  # 1: memory was released, 0: none could be
