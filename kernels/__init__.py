"""qlora_jax.kernels: fused NF4 kernels (Pallas) with an XLA reference path."""
