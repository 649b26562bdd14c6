#!/usr/bin/env bash
# Wheels that bench/gpu_figures.py needs on the lent GPU machine, whose image has jax (with
# CUDA), flax, optax, orbax-checkpoint, transformers, torch and safetensors but not the rest of
# our dependencies, and which cannot download anything. Writes .whl/ in the repository root
# (git-ignored; carry it): .whl/ for the pipeline, .whl/peer/ diffusers 0.35.2 (the Flax peer),
# .whl/parity/ diffusers for the random SD 1.5 pipeline's PyTorch classes. Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
download() {  # folder, requirement...
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "$@"
}
rm -rf .whl && mkdir -p .whl/peer .whl/parity
download .whl "grain==0.2.18" "array-record==0.8.6" "ml-collections==1.1.0" \
  "tensorboardX==2.6.5" "braceexpand==0.1.7" "portpicker==1.6.0"
download .whl/peer "diffusers==0.35.2"
download .whl/parity "diffusers==0.42.1"
du -sh .whl
