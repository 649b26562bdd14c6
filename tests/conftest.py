import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.xla_env import xla_flags  # noqa: E402  (needs ROOT on the path; imports no jax)
from train.host_devices import huge_pages_environment  # noqa: E402  (imports no jax)

# Eight fake CPU devices, set before anything imports jax, so sharding code paths are real;
# LLVM optimisation off for the tests' short-lived programs (tests/xla_env.py).
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Huge pages for XLA's large host buffers, as the CLIs run (train/host_devices.py): glibc reads
# the tunable when a process starts, so it reaches pytest-xdist's workers (started after this
# file loads) and the CLI subprocesses, which then need no restart of their own.
_HUGE_PAGES = huge_pages_environment()
if _HUGE_PAGES is not None:
    os.environ["GLIBC_TUNABLES"] = _HUGE_PAGES["GLIBC_TUNABLES"]
# One persistent compilation cache for the whole session, inherited by the CLI subprocesses the
# slow tests start: the tiny config's train step is compiled by many tests and processes, and
# XLA's cache key covers the program, the devices and the flags, so a hit is the same program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="t2i_test_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, in their own order. pytest-xdist's `--dist loadfile` hands
    out whole files in collection order; a long CLI file drawn last keeps one worker busy while
    the other idles, and the short files fill in around the long ones when these go first."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    # Stable sort: the longest files measured first, then the other slow ones, then the rest.
    items.sort(key=lambda item: (item.path.name not in _LONGEST_FILES,
                                 item.path not in slow_files))


# The longest test files (docs/testing.md): real multi-process runs and the preemption chain.
_LONGEST_FILES = ("test_multihost.py", "test_preemption.py", "test_end_to_end.py")
