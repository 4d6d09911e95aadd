#!/usr/bin/env bash
# One prepared run on a machine with a GPU (its image has JAX with CUDA, flax, optax, torch,
# transformers): the test suite under JAX on the GPU, then the sweep benchmark at full width.
set -u
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -15
timeout 330 python3 benchmarks/benchmark_sweep.py --sizes full --caches warm --dir /tmp/sweep_gpu 2>&1 | grep -v '^\[{'
