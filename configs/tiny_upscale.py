"""Tiny super-resolution stage (4x4 -> 16x16) for tests and smoke runs: configs/tiny.py with
the changes of configs/demo_upscale.py.

    python -m train --config configs/tiny_upscale.py --workdir /tmp/t2i_tiny_upscale
"""

from configs import tiny
from configs.demo_upscale import make_super_resolution


def get_config():
    return make_super_resolution(tiny.get_config(), factor=4, max_noise_level=350)
