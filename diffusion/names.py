"""The names of the solvers and timestep spacings, importable without JAX (the CLIs define
their flag enums before JAX may be imported; `diffusion.sampling` builds its registry from
these)."""

SOLVER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral", "heun")
# Solvers that take a Karras sigma schedule (DDPM / DDIM step on the training timesteps).
KARRAS_SOLVERS = ("dpmpp_2m", "euler", "euler_ancestral", "heun")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
