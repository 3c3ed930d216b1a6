"""Triton's interpreter for the jax_triton kernels, in a worker process started with ``TRITON_INTERPRET=1``.

Triton decides at import time whether ``@triton.jit`` (its own standard library included, e.g.
``tl.zeros``, ``tl.max``) compiles or interprets, so one process cannot both lower the kernels for
CUDA through jax_triton and interpret them. :class:`InterpreterWorker` starts this file as a
script (``python -P``, the same interpreter and environment, ``TRITON_INTERPRET=1``) on first use
and keeps it; each request sends the kernel's name, the input arrays, the output shapes, the grid
and the meta-parameters as one pickle over a pipe, and gets the outputs back. In the worker the
arrays are handed to the interpreter as :class:`HostTensor` (numpy buffers with the few tensor
methods the interpreter calls), so no torch is needed: the Python 3.12 environment suffices.

The worker imports only numpy, ml_dtypes and triton, and loads :mod:`.kernels` by file path.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any, BinaryIO

import numpy as np

__all__ = ["HostTensor", "InterpreterWorker", "run_interpreted"]

_KERNELS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py")
_TORCH_DTYPE_NAMES = {"bfloat16", "float16", "float32", "uint8", "int32", "int8"}


class HostTensor:
    """A C-contiguous numpy buffer with the tensor methods Triton's interpreter calls.

    The interpreter reads and writes memory through ``data_ptr()``, takes the element type from
    ``dtype`` (a torch dtype name) and "copies to the host" through ``untyped_storage``, ``cpu``,
    ``new_empty``, ``set_`` and back through ``copy_``: on a host buffer, the buffer itself.
    """

    def __init__(self, array: np.ndarray):
        if not array.flags.c_contiguous:
            raise ValueError("HostTensor needs a C-contiguous array")
        if array.dtype.name not in _TORCH_DTYPE_NAMES:
            raise TypeError(f"no interpreter dtype for {array.dtype.name}; "
                            f"expected one of {sorted(_TORCH_DTYPE_NAMES)}")
        self.array = array
        self.dtype = f"torch.{array.dtype.name}"

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self) -> HostTensor:
        return self

    def cpu(self) -> HostTensor:
        return self

    def new_empty(self, *args: Any, **kwargs: Any) -> HostTensor:
        return self

    def set_(self, *args: Any) -> HostTensor:
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return self.array.shape

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def copy_(self, other: HostTensor) -> None:
        if other is not self:
            np.copyto(self.array, other.array)


def _send(stream: BinaryIO, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the interpreter worker closed its pipe")
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def run_interpreted(kernels: Any, name: str, inputs: list[np.ndarray], outputs: list[np.ndarray],
                    grid: tuple[int, ...], meta: dict[str, Any]) -> None:
    """Runs ``kernels.<name>`` (an interpreted function) over ``grid``, writing into ``outputs``."""
    buffers = [HostTensor(np.ascontiguousarray(a)) for a in inputs] + [HostTensor(o) for o in outputs]
    getattr(kernels, name)[grid](*buffers, **meta)


def _serve() -> None:
    import importlib.util

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the interpreter worker needs TRITON_INTERPRET=1 before triton is imported")
    import ml_dtypes  # noqa: F401 - registers bfloat16 for the pickled arrays

    spec = importlib.util.spec_from_file_location("qlora_jax_jt_kernels_interpreted", _KERNELS_FILE)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything the kernels print must not corrupt the pipe
    while True:
        try:
            name, inputs, outputs, grid, meta = _receive(stdin)
        except EOFError:
            return
        try:
            run_interpreted(kernels, name, inputs, outputs, grid, meta)
            _send(stdout, ("ok", outputs))
        except Exception as error:  # noqa: BLE001 - reported to the caller, which raises it
            _send(stdout, ("error", f"{type(error).__name__}: {error}"))


class InterpreterWorker:
    """The worker process (started on first use, one per process, calls serialized)."""

    _lock = threading.Lock()
    _process: subprocess.Popen | None = None

    @classmethod
    def _start(cls) -> subprocess.Popen:
        if cls._process is None or cls._process.poll() is not None:
            env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
            cls._process = subprocess.Popen([sys.executable, "-P", __file__], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, env=env)
            atexit.register(cls._process.kill)
        return cls._process

    @classmethod
    def run(cls, name: str, inputs: list[np.ndarray], outputs: list[np.ndarray], grid: tuple[int, ...],
            meta: dict[str, Any]) -> list[np.ndarray]:
        """The outputs of ``kernels.<name>`` run by the interpreter (``outputs`` give their initial contents)."""
        with cls._lock:
            process = cls._start()
            _send(process.stdin, (name, inputs, outputs, grid, meta))
            status, result = _receive(process.stdout)
        if status != "ok":
            raise RuntimeError(f"Triton's interpreter failed in {name}: {result}")
        return result


if __name__ == "__main__":
    _serve()
