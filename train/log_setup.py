"""Console logging for the CLIs: INFO for the pipeline, warnings only from chatty libraries."""

import logging as std_logging

from absl import logging

_QUIET_LIBRARIES = ("orbax", "jax/_src", "tensorstore")


class _QuietLibraries(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(name in record.pathname for name in _QUIET_LIBRARIES)


def setup_logging() -> None:
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())
