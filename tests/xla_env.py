"""XLA flags of the test processes and of the CLI subprocesses they start.

The suite's time is mostly XLA compiling the tiny configs' distinct programs (a train step, a
sampler, a parity run), each run for a few steps only. LLVM's backend optimisation is most of
a CPU compile: at level 0 the tiny train step compiles in about 60% of the time and runs
about 1.6x slower, a good trade for programs run a handful of times. Every process of a test
gets the same flags, so comparisons between processes (1 vs 2 processes, an interrupted vs an
uninterrupted run) still compare identical programs. The demo, the bench and users' runs keep
XLA's defaults. Set T2I_TEST_XLA_OPTIMIZE=1 to run the suite with them too.
"""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
FAST_COMPILE_FLAGS = (
    "" if os.environ.get("T2I_TEST_XLA_OPTIMIZE") == "1" else "--xla_backend_optimization_level=0")


def xla_flags(devices: int, *extra: str) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return " ".join(flag for flag in (f"{DEVICE_COUNT_FLAG}={devices}", *extra, FAST_COMPILE_FLAGS)
                    if flag)
