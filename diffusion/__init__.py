"""Diffusion math: schedules, parameterizations, losses, guidance, solvers and the sampling loop.

Pure jnp functions over arrays; no Flax modules and no I/O, so everything here can sit inside
the jitted train step and sampler. Import the submodules (`diffusion.sampling`, ...):
this package file imports nothing, so `diffusion.names` stays importable before JAX is.
"""

