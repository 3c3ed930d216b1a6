#!/usr/bin/env bash
# Makes a CUDA machine's own Python ($1, default python3: jax with CUDA, torch, transformers, peft
# already installed, no package index reachable) ready for `python -m experiments.bench_gpu`:
#   1. installs the wheels carried in .whl/ (bitsandbytes, jax-triton, gguf), without dependencies;
#   2. installs this checkout (editable, so `kernels/` imports as qlora_jax.kernels), offline.
# Fetch the wheels beforehand on a machine with a package index (about 42 MB; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl bitsandbytes==0.50.2 jax-triton==0.4.1 gguf==0.19.0
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
PIP=("$PYTHON" -m pip --disable-pip-version-check)
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  "${PIP[@]}" install -q --no-index --no-deps --no-compile "${wheels[@]}"
else
  echo "no wheels in .whl/: bitsandbytes and jax-triton rows will say they are missing" >&2
fi
if ! "$PYTHON" -c "import qlora_jax.kernels" 2>/dev/null; then
  "${PIP[@]}" install -q --no-index --no-deps --no-build-isolation -e .
fi
"$PYTHON" -c "import jax, qlora_jax.kernels; print('ready:', jax.devices())"
