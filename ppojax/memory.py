"""Host memory: hand the XLA compiler's freed memory back to the operating system after every compilation.

Compiling a program (the PPO train step above all) takes hundreds of MB of host memory that the compiler frees
when it is done, but glibc's malloc keeps freed pages mapped, so the process's resident set keeps them while the
compiled program then allocates its own buffers on top. `release_compiler_memory()` runs glibc's
`malloc_trim(0)` after every backend compilation (a `jax.monitoring` event, so the trim happens before the new
program's first run). Measured on the benchmark's PPO workload (BUILD_NOTES.md, Benchmarks): peak RSS 2.18 →
1.61 GB, no effect on speed (one trim per compilation). The `ppojax` command turns it on; from Python, call it
once. Elsewhere (musl, macOS, another malloc preloaded) it does nothing harmful: no `malloc_trim` symbol means
it stays off, and under jemalloc glibc's trim has nothing to return.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_trim = None  # the active trim function, once registered


def _malloc_trim():
    """glibc's `malloc_trim(0)` as a function of no arguments, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def release_compiler_memory(trim=None) -> bool:
    """After every XLA compilation in this process, return the freed heap pages to the OS. Idempotent; returns
    whether it is on (False where there is no `malloc_trim`). `trim` replaces glibc's call (tests)."""
    global _trim
    if _trim is not None:
        return True
    trim = trim or _malloc_trim()
    if trim is None:
        return False

    def after_compile(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            trim()

    jax.monitoring.register_event_duration_secs_listener(after_compile)
    _trim = trim
    return True
