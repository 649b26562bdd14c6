"""SIGTERM -> save at the current step and exit cleanly, with every host saving the same step.

Multi-process runs use JAX's preemption sync point: the distributed runtime catches SIGTERM on
any host, agrees on a step all hosts will reach, and `reached(step)` turns True there on every
host at once. A single process has no distributed runtime; a plain SIGTERM handler sets a flag
that the loop reads after each step.
"""

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """`reached(step)`: True when the run should save `step` and stop. Call it after every
    step with the number of steps done, the same on all hosts."""

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._flag = threading.Event()
        self._previous = None
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._multi_process:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled (jax_enable_preemption_service)
                return False
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
