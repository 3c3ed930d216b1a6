"""Shared fixtures: the reference implementations the tests compare against.

* ``oracle``: runs a script from tests/oracles/ in the separate Python 3.11 environment that
  holds torch (CPU), bitsandbytes, transformers and peft (``make oracle`` builds it). Arrays go
  in and out through .npz files. A missing oracle environment fails the tests that need it,
  loudly; set QLORA_JAX_SKIP_ORACLE=1 to skip them instead on a machine that cannot build it.
* ``bnb_cuda_reference``: bitsandbytes' CUDA quantization code, compiled for the host with g++.
* ``tiny_model``: a small random Llama folder with the embedded model's tokenizer (for recipe tests).
* ``good``: a valid float32 folder of ``helpers.CONFIG`` and its tensors (for the checkpoint readers' tests).
"""

from __future__ import annotations

import os

# Eight host devices for the sharding tests; set before anything imports jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import ctypes
import gc
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator

import numpy as np
import pytest

# One persistent XLA compilation cache per test run, shared by the xdist workers and every
# subprocess the tests start (recipe, launcher, kill and multi-process tests), set before anything
# imports jax. Why: on 2 cores compiling is most of the suite's time, and many tests compile the
# same programs (the tiny Llama's train and eval steps) in fresh closures or fresh processes,
# which jax's in-memory cache cannot share. An executable loaded from the cache is the one XLA
# compiled, so no result changes. The first process to import this file (the xdist controller, or
# the only process) makes the directory and removes it at the end; the workers inherit it.
# JAX_COMPILATION_CACHE_DIR set by the caller wins; QLORA_JAX_TEST_XLA_CACHE=0 turns this off.
_OWN_XLA_CACHE: str | None = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("QLORA_JAX_TEST_XLA_CACHE", "1") != "0":
    _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="qlora-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

REPO = pathlib.Path(__file__).resolve().parents[1]
ORACLE_DIR = REPO / "tests" / "oracles"


def oracle_python() -> pathlib.Path:
    """Interpreter of the oracle environment (QLORA_JAX_ORACLE_PYTHON overrides)."""
    return pathlib.Path(os.environ.get("QLORA_JAX_ORACLE_PYTHON", REPO / ".venv-oracle" / "bin" / "python"))


class Oracle:
    """Runs oracle scripts in the Python 3.11 environment; see the module docstring.

    The scripts run in children forked by one long-lived ``tests/oracles/fork_server.py`` per test
    process, which imports torch, transformers, PEFT and bitsandbytes once (several seconds of CPU
    each time otherwise); each run still starts from that freshly imported state. A server that
    died is started again on the next run; one that overruns ``timeout`` is killed with its child.
    QLORA_JAX_ORACLE_SERVER=0 runs each script in its own process instead.
    """

    # -P keeps a script's folder off sys.path; a temporary cwd keeps our top-level `kernels/` from
    # shadowing the `kernels` package that bitsandbytes and transformers probe for.
    ENV = {"PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}

    def __init__(self, python: pathlib.Path):
        self.python = python
        self.use_server = os.environ.get("QLORA_JAX_ORACLE_SERVER", "1") != "0"
        self._server: subprocess.Popen | None = None
        self._server_dir: tempfile.TemporaryDirectory | None = None

    def run(self, script: str, arrays: dict[str, np.ndarray], config: dict, timeout: float = 900) -> dict:
        with tempfile.TemporaryDirectory(prefix="qlora_jax_oracle_") as tmp:
            tmp = pathlib.Path(tmp)
            np.savez(tmp / "in.npz", **arrays)
            (tmp / "config.json").write_text(json.dumps(config))
            args = ["in.npz", "config.json", "out.npz"]
            if self.use_server:
                returncode, stderr = self._run_in_server(str(ORACLE_DIR / script), args, tmp, timeout)
            else:
                proc = subprocess.run([str(self.python), "-P", str(ORACLE_DIR / script), *args], cwd=tmp,
                                      capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, **self.ENV})
                returncode, stderr = proc.returncode, proc.stderr
            if returncode != 0:
                raise RuntimeError(f"oracle {script} failed ({returncode}):\n{stderr[-6000:]}")
            with np.load(tmp / "out.npz") as out:
                return {k: out[k] for k in out.files}

    def _run_in_server(self, script: str, args: list[str], cwd: pathlib.Path, timeout: float) -> tuple[int, str]:
        import select

        if self._server is None or self._server.poll() is not None:
            self._start_server()
        server = self._server
        server.stdin.write(json.dumps({"script": script, "args": args, "cwd": str(cwd)}) + "\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        answer = server.stdout.readline() if ready else ""
        stderr_file = cwd / "stderr.txt"
        stderr = stderr_file.read_text(errors="replace") if stderr_file.exists() else ""
        if not ready:
            self.close()  # the server's process group: the server and the child that overran
            raise subprocess.TimeoutExpired(script, timeout, stderr=stderr)
        if not answer:
            server.wait(timeout=60)
            server_stderr = (pathlib.Path(self._server_dir.name) / "server_stderr.txt").read_text(errors="replace")
            self.close()
            raise RuntimeError(f"the oracle server died ({server.returncode}) running {script}:\n"
                               f"{server_stderr[-3000:]}\n{stderr[-3000:]}")
        return json.loads(answer)["returncode"], stderr

    def _start_server(self) -> None:
        self._server_dir = tempfile.TemporaryDirectory(prefix="qlora_jax_oracle_server_")
        with open(pathlib.Path(self._server_dir.name) / "server_stderr.txt", "w") as server_stderr:
            self._server = subprocess.Popen(
                [str(self.python), "-P", str(ORACLE_DIR / "fork_server.py")], cwd=self._server_dir.name,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=server_stderr, text=True,
                start_new_session=True, env={**os.environ, **self.ENV})

    def close(self) -> None:
        """Stops the server (and any child it is running)."""
        if self._server is not None:
            if self._server.poll() is None:
                os.killpg(self._server.pid, 9)
            self._server.wait(timeout=60)
            self._server = None
        if self._server_dir is not None:
            self._server_dir.cleanup()
            self._server_dir = None


@pytest.fixture(scope="session")
def oracle() -> Iterator[Oracle]:
    python = oracle_python()
    if not python.exists():
        message = (
            f"the oracle environment is missing ({python}): run `make oracle` to build it "
            "(Python 3.11 with torch CPU, bitsandbytes, transformers, peft)"
        )
        if os.environ.get("QLORA_JAX_SKIP_ORACLE") == "1":
            pytest.skip(message)
        pytest.fail(message)
    oracle = Oracle(python)
    yield oracle
    oracle.close()


class BnbCudaReference:
    """ctypes wrapper of tests/oracles/bnb_cuda_reference.cc (bitsandbytes' CUDA arithmetic)."""

    def __init__(self, library: pathlib.Path):
        self.lib = ctypes.CDLL(str(library))

    @staticmethod
    def _ptr(a: np.ndarray):
        return a.ctypes.data_as(ctypes.c_void_p)

    def quantize_blockwise_8bit(self, a: np.ndarray, code: np.ndarray, blocksize: int):
        """(codes uint8[n], absmax float32[blocks]) as bitsandbytes' CUDA kernel computes them."""
        a = np.ascontiguousarray(a, np.float32).reshape(-1)
        code = np.ascontiguousarray(code, np.float32)
        n = a.size
        out = np.empty(n, np.uint8)
        absmax = np.empty(-(-n // blocksize), np.float32)
        self.lib.quantize_blockwise_8bit(
            self._ptr(code), self._ptr(a), self._ptr(absmax), self._ptr(out),
            ctypes.c_longlong(blocksize), ctypes.c_longlong(n),
        )
        return out, absmax

    def quantize_4bit(self, a: np.ndarray, quant_type: str, blocksize: int):
        """(packed uint8[(n+1)//2], absmax float32[blocks]) as bitsandbytes' CUDA kernel."""
        a = np.ascontiguousarray(a, np.float32).reshape(-1)
        n = a.size
        out = np.empty((n + 1) // 2, np.uint8)
        absmax = np.empty(-(-n // blocksize), np.float32)
        self.lib.quantize_4bit(
            self._ptr(a), self._ptr(absmax), self._ptr(out),
            ctypes.c_longlong(blocksize), ctypes.c_longlong(n), ctypes.c_int(quant_type == "nf4"),
        )
        return out, absmax


@pytest.fixture(scope="session")
def bnb_cuda_reference(tmp_path_factory) -> BnbCudaReference:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.fail("g++ is needed to compile tests/oracles/bnb_cuda_reference.cc")
    library = tmp_path_factory.mktemp("bnb_cuda_reference") / "bnb_cuda_reference.so"
    # -ffp-contract=off: nvcc would not fuse these operations either (no multiply feeds an add).
    subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(library),
         str(ORACLE_DIR / "bnb_cuda_reference.cc")],
        check=True,
    )
    return BnbCudaReference(library)


# The run's entropy: every generator of the run derives from it, so QLORA_JAX_TEST_SEED replays
# a whole run, module-scoped fixtures included. It is fixed by default, so CI's verdict on a commit is
# the same every run (a statistical test's rare false alarm cannot come and go);
# QLORA_JAX_TEST_SEED=random draws fresh entropy to explore other inputs.
def _run_entropy(setting: str) -> int:
    if setting == "random":
        return np.random.SeedSequence().entropy % (1 << 63)
    try:
        return int(setting)
    except ValueError:
        raise ValueError(f"QLORA_JAX_TEST_SEED={setting!r}: expected an integer or 'random'") from None


RUN_ENTROPY = _run_entropy(os.environ.get("QLORA_JAX_TEST_SEED", "20260101"))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name and the run's entropy.

    QLORA_JAX_TEST_SEED sets the run's entropy (an integer, or 'random'); the seed is printed on failure.
    """
    request.node.user_properties.append(("seed", RUN_ENTROPY))
    return np.random.default_rng([RUN_ENTROPY, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(scope="module")
def module_rng(request) -> np.random.Generator:
    """A generator for module-scoped fixtures, seeded from the module's name and the run's entropy."""
    return np.random.default_rng([RUN_ENTROPY, zlib.crc32(request.module.__name__.encode())])


def pytest_report_header(config) -> str:
    return f"random seed: QLORA_JAX_TEST_SEED={RUN_ENTROPY}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("random seed", f"QLORA_JAX_TEST_SEED={RUN_ENTROPY}"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A 2-layer, 64-wide random Llama with the embedded model's tokenizer (so the chat data fits it)."""
    from helpers import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"),
                            np.random.default_rng([RUN_ENTROPY, zlib.crc32(b"tiny_model")]))


@pytest.fixture(scope="module")
def good(tmp_path_factory, module_rng) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """A valid float32 folder of ``helpers.CONFIG`` and its tensors, for the tests of what reads
    checkpoints. Module-scoped: a test copies the tensors (``helpers.variant``) before changing any."""
    from helpers import CONFIG, random_tensors, write_folder

    tensors = random_tensors(module_rng, CONFIG)
    return write_folder(tmp_path_factory.mktemp("good"), CONFIG, tensors), tensors


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session) -> None:
    """Frees JAX's compiled programs and collects garbage while the session still counts as running.

    Why: when an xdist run ends, the controller tells each worker to stop, and execnet sends a
    worker that is still busy 5 s later a SIGINT (``execnet.gateway_base``, ``_terminate_execution``).
    A worker is then still in pytest's session-end garbage collection (the unraisableexception
    plugin's, several rounds over every compiled program the tests left); on 2 loaded cores that
    took longer, and the SIGINT surfaced as ``PytestUnraisableExceptionWarning: KeyboardInterrupt``
    in jax's ``_xla_gc_callback``. This runs before the worker reports that it has finished, so the
    clock starts on a small heap.
    """
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    if _OWN_XLA_CACHE is not None and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)  # a cache only: nothing in it is a result


@pytest.fixture
def quantizer_calls(monkeypatch):
    """Counts calls into the quantizer: every name bound to its entry points in any qlora_jax module."""
    import sys

    import qlora_jax.quant.tensor as tensor

    originals = {id(tensor.quantize): tensor.quantize, id(tensor.double_quantize): tensor.double_quantize,
                 id(tensor._quantize_jit): tensor._quantize_jit}
    calls = {"count": 0, "forbidden": False}

    def spy(function):
        def wrapper(*args, **kwargs):
            if calls["forbidden"]:
                raise AssertionError(f"the quantizer was called ({function.__name__})")
            calls["count"] += 1
            return function(*args, **kwargs)
        return wrapper

    for module in [m for name, m in sys.modules.items() if name.startswith("qlora_jax") and m is not None]:
        for attribute, value in list(vars(module).items()):
            if id(value) in originals:
                monkeypatch.setattr(module, attribute, spy(value))
    return calls
