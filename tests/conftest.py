import os
import sys
import tempfile

# Eight fake CPU devices, set before anything imports jax, so sharding code paths are real.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One persistent compilation cache for the whole session, inherited by the CLI subprocesses the
# slow tests start: the tiny config's train step is compiled by many tests and processes, and
# XLA's cache key covers the program, the devices and the flags, so a hit is the same program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="t2i_test_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
