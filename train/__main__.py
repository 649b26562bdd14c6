"""python -m train --config configs/demo.py --workdir DIR [--config.optim.learning_rate=1e-3 ...]"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train.host_devices import apply_cpu_devices_flag, define_cpu_devices_flag

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (a get_config() module).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, config.json and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])
_CPU_DEVICES = define_cpu_devices_flag()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    apply_cpu_devices_flag(_CPU_DEVICES.value, _CONFIG.value.train.global_batch_size)
    import jax

    from train.log_setup import setup_logging
    from train.loop import train_and_evaluate

    setup_logging()
    logging.info("JAX devices: %d (%s), processes: %d", jax.device_count(),
                 jax.default_backend(), jax.process_count())
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("done: %s", summary)


def run():
    sys.path.insert(0, os.getcwd())  # `configs.*` imports resolve from the launch directory
    app.run(main)


if __name__ == "__main__":
    run()
