#!/usr/bin/env bash
# Creates the test-oracle environment at $1 (default .venv-oracle): Python 3.11 with torch (CPU
# build), bitsandbytes, transformers and peft, the reference implementations the tests compare
# against. Python 3.11 because torch's CPU build is what pip finds for it on the project's
# machines, where Python 3.12 would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip here may be configured with local indexes that do not exist; its "ignored" notices are noise.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
VENV="${1:-.venv-oracle}"

find_python311() {
  for candidate in "$(pyenv root 2>/dev/null)/versions/3.11"*/bin/python3 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "error: the test oracles need Python 3.11 with venv (e.g. pyenv install 3.11)" >&2
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PYTHON="$(find_python311)"
  echo "creating $VENV with $PYTHON ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
fi
quiet_pip "$VENV/bin/python" -m pip --disable-pip-version-check install -q -r requirements/oracle.txt
# -P and a neutral working directory: the repository's top-level kernels/ folder must not shadow
# the `kernels` package that transformers probes for.
PYTHON_ABS="$(cd "$(dirname "$VENV/bin/python")" && pwd)/python"
(cd "$(mktemp -d)" && "$PYTHON_ABS" -P -c "
import torch, bitsandbytes, transformers, peft
assert torch.__version__.endswith('+cpu') or not torch.cuda.is_available(), torch.__version__
print('oracle: torch', torch.__version__, 'bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)
" 2>&1 | { grep -v "kernels-community" || true; })
