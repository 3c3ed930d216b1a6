"""The ``jax_triton`` backend: 4-bit kernels in the Triton language, called from JAX through jax-triton.

* :mod:`.kernels`: the ``@triton.jit`` kernels (forward dequant-matmul, its input gradient,
  dequantize, quantize), with their exactness contract;
* :mod:`.ops`: their JAX entry points (``jax_triton.triton_call``), the autotuning
  configurations per size class, and the interpreter adapter;
* :mod:`.interpreter`: the worker process that runs them through Triton's interpreter
  (``interpret=True``, CPU tests).

Their pure-JAX references are those of the Pallas kernels (:mod:`qlora_jax.kernels.matmul_triton`,
:mod:`qlora_jax.kernels.dequantize_triton`, :mod:`qlora_jax.kernels.quantize_triton`). Importing
this package imports nothing: triton and jax-triton are optional (the ``gpu`` extra), and
:func:`qlora_jax.kernels.jax_triton_missing` says whether they are usable.
"""
