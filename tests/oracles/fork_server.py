"""Fork server for the oracle scripts (runs in the .venv-oracle environment, Python 3.11).

Usage: python -P fork_server.py   (requests on stdin, one JSON line each; answers on stdout)

Importing torch, transformers, PEFT and bitsandbytes takes several seconds of CPU, and the test
suite runs the oracle scripts dozens of times. This process imports them once, then runs each
request in a forked child, so every script still starts from the same freshly imported state and
nothing one script changes (default dtype, seeds, patched functions) reaches another.

A request is ``{"script": path, "args": [...], "cwd": dir}``: the child changes to ``cwd``, sends
its stdout and stderr to ``cwd/stdout.txt`` and ``cwd/stderr.txt``, and runs ``script`` as
``__main__`` with ``sys.argv = [script, *args]`` (the script's folder is not put on sys.path, as
``python -P script`` would not). The answer is ``{"returncode": n}`` (negative: killed by signal n).

Why fork is safe here: this process only imports; it never runs a torch operation, so no OpenMP
thread team exists to be lost in the child.
"""

import json
import os
import runpy
import sys
import traceback
import warnings

warnings.filterwarnings("ignore")

import bitsandbytes  # noqa: E402,F401
import numpy  # noqa: E402,F401
import peft  # noqa: E402,F401
import safetensors.torch  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402,F401


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's whole life
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the requests are the server's, not the script's
    sys.argv = [request["script"], *request["args"]]
    try:
        runpy.run_path(request["script"], run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - reported to the test through stderr.txt and the code
        traceback.print_exc()
        return 1


def main() -> None:
    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            except BaseException:  # noqa: BLE001 - e.g. a cwd that vanished: said on stderr
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
