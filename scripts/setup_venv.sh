#!/usr/bin/env bash
# Creates the Python 3.12 environment for qlora-jax at $1 (default .venv) with pinned versions,
# the library installed editable, and the embedded model and datasets.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip here may be configured with local indexes that do not exist; its "ignored" notices are noise.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
VENV="${1:-.venv}"

find_python312() {
  # .python-version (3.12) makes pyenv's `python3` resolve to 3.12 in this directory.
  for candidate in python3 python3.12 "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "error: Python >= 3.12 is needed (jax >= 0.11); install it (e.g. pyenv install 3.12)" >&2
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PYTHON="$(find_python312)"
  echo "creating $VENV with $PYTHON ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
quiet_pip "${PIP[@]}" install -q -c requirements/ci.txt -e ".[test,data]"
# The build backend pyproject.toml names, pinned: a venv from `python -m venv` has none, and the test
# that pip-installs the package into a fresh venv builds it offline with this one (--no-build-isolation).
quiet_pip "${PIP[@]}" install -q -c requirements/ci.txt setuptools wheel
quiet_pip "${PIP[@]}" install -q --no-deps --require-hashes -r requirements/assets.txt
# The lm-eval extra (qlora_jax.eval.lm_eval_model, experiments/lm_eval.py), pinned against ci.txt.
quiet_pip "${PIP[@]}" install -q -c requirements/ci.txt -r requirements/lm-eval.txt
# Third-party JAX models the tests convert unedited, and qwix (requirements/thirdparty.txt says why --no-deps).
quiet_pip "${PIP[@]}" install -q --no-deps -r requirements/thirdparty.txt
# The CUDA plugin's jaxlib extensions (not its CUDA libraries): jax_triton needs them to lower the
# Triton kernels for CUDA, which the tests do on this GPU-less machine. Same version as jaxlib.
if [[ "$(uname -s)" == "Linux" ]]; then
  quiet_pip "${PIP[@]}" install -q --no-deps -c requirements/ci.txt jax-cuda13-plugin
fi
"$VENV/bin/python" -c "import jax, qlora_jax, qlora_jax.kernels; print('qlora-jax', qlora_jax.__version__, 'with jax', jax.__version__)"
