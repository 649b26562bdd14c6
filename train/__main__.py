"""python -m train --config configs/demo.py --workdir DIR [--config.optim.learning_rate=1e-3 ...]

Multi-host: the same command on every host, plus `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` where JAX cannot detect the cluster itself (it does on TPU pod
slices and under SLURM). `--dry_run` validates config, mesh and data, compiles the step, prints
the plan and exits. A SIGTERM saves a checkpoint at the current step and exits 0.
User errors (bad config, missing data, a workdir in use, ...) end in one line and exit 2.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import distributed, host_devices
from train.distributed import define_distributed_flags, initialize
from train.host_devices import (
    apply_cpu_devices_flag,
    auto_device_count,
    define_cpu_devices_flag,
    restart_with_huge_pages,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (a get_config() module).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, config.json and TensorBoard logs (a local path or an "
    "fsspec/epath URL such as gs://bucket/run).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate config, mesh and data, compile, print the plan, exit.")
flags.mark_flags_as_required(["config", "workdir"])
_CPU_DEVICES = define_cpu_devices_flag()
_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID = define_distributed_flags()
# Listed by --help with this module's own flags (absl shows only the main module's by default).
flags.adopt_module_key_flags(distributed)
flags.adopt_module_key_flags(host_devices)

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1


class UsageError(ValueError):
    """A launch the pipeline cannot run as asked (reported in one line, exit 2)."""


def _check_cpu_split(requested: int, global_batch_size: int, user_split: bool) -> None:
    """--cpu_devices=-1 asks for one CPU device per core; a batch that does not divide over them
    used to fall back to fewer devices without a word. Only CPU runs are concerned."""
    import jax

    if requested != -1 or user_split or jax.default_backend() != "cpu":
        return
    cores = auto_device_count()
    if cores > 1 and global_batch_size % cores:
        raise UsageError(
            f"config.train.global_batch_size={global_batch_size} does not divide over the "
            f"{cores} CPU devices (one per core) that --cpu_devices=-1 asks for; use a multiple "
            f"of {cores}, or --cpu_devices=N with N dividing it (1: one device)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    # Config errors first, before the devices, the cluster and the training modules start.
    from train.config_check import resolve_and_validate

    resolve_and_validate(config)
    user_split = "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    apply_cpu_devices_flag(_CPU_DEVICES.value, config.train.global_batch_size)
    # Before anything else touches the JAX backend.
    try:
        initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as error:  # flags that do not go together
        raise UsageError(str(error)) from error
    import jax

    from train.log_setup import setup_logging
    from train.loop import format_plan, train_and_evaluate

    setup_logging()
    _check_cpu_split(_CPU_DEVICES.value, config.train.global_batch_size, user_split)
    logging.info("JAX devices: %d (%s), processes: %d", jax.device_count(),
                 jax.default_backend(), jax.process_count())
    if _DRY_RUN.value:
        plan = train_and_evaluate(config, _WORKDIR.value, dry_run=True)
        if jax.process_index() == 0:
            print(format_plan(plan))
            print("dry run: config, mesh, data and the compiled step are fine")
        return
    summary = train_and_evaluate(config, _WORKDIR.value)
    if summary.get("preempted"):
        logging.warning("stopped by a preemption notice after saving step %d", summary["step"])
    logging.info("done: %s", summary)


def _user_error_types() -> tuple:
    from train.checkpoint import IncompatibleCheckpointError, NoCheckpointError
    from train.config_check import ConfigError
    from train.lock import WorkdirLockedError

    return (UsageError, ConfigError, IncompatibleCheckpointError, NoCheckpointError,
            WorkdirLockedError, FileNotFoundError, flags.Error)


def _parse_flags(argv):
    """app.run's flag parser with one-line errors: a bad `--config.x=...` otherwise raises from
    the config override (AttributeError, KeyError, TypeError) with a long traceback."""
    try:
        remaining = flags.FLAGS(argv)
        # A config file that failed to load raises only when first used: use it now.
        _CONFIG.value.keys()
    except flags.Error as error:
        _fail(str(error))
    except AttributeError as error:  # ConfigDict's message for an unknown field
        detail = str(error.args[0] if error.args else error)
        detail = detail.replace("\\n", " ").replace("\\'", "'").strip("'\" ")
        _fail(f"--config: no such config field: {detail}")
    except OSError as error:  # config file missing or unreadable
        _fail(f"--config: {error}")
    except (KeyError, TypeError, ValueError, ImportError, SyntaxError) as error:
        _fail(f"--config: {type(error).__name__}: {error}")
    return remaining


def run(argv=None):
    if argv is None:  # launched as a command (not called with its own arguments)
        restart_with_huge_pages()
    sys.path.insert(0, os.getcwd())  # `configs.*` imports resolve from the launch directory
    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except SystemExit:
        raise
    except _user_error_types() as error:
        _fail(str(error))
    except FloatingPointError as error:  # the loop's NonFiniteLossError: diverged, not misused
        _fail(str(error), code=EXIT_DIVERGED)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    one_line = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"train: error: {one_line}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    run()
