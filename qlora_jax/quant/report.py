"""Storage accounting of quantized tensors: bytes per component and bits per parameter."""

from __future__ import annotations

import dataclasses
import math

from qlora_jax.quant.tensor import NESTED_BLOCKSIZE, QuantizedTensor

__all__ = ["StorageReport", "storage_report", "storage_report_for"]

_CODE_BITS = {"nf4": 4, "fp4": 4, "int8": 8, "bf16": 16, "float16": 16, "float32": 32}


@dataclasses.dataclass(frozen=True)
class StorageReport:
    """What a quantized tensor costs to store. Sizes in bytes; ``bits_per_param`` per element.

    The code tables (16 or 256 float32 shared by every tensor of a type) are not counted: they
    are constants of the data type, not of the tensor.

    Attributes:
      numel: number of elements of the tensor.
      codes_bytes: bytes of the packed codes.
      scales_bytes: bytes of the scales (float32, or uint8 with double quantization).
      nested_scales_bytes: bytes of the float32 nested scales (0 without double quantization).
      offset_bytes: bytes of the float32 offset (4 with double quantization, else 0).

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023 (the bits per parameter of double quantization).
    """

    numel: int
    codes_bytes: int
    scales_bytes: int
    nested_scales_bytes: int
    offset_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.codes_bytes + self.scales_bytes + self.nested_scales_bytes + self.offset_bytes

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.total_bytes / self.numel

    @property
    def scale_bits_per_param(self) -> float:
        """Bits per parameter spent on quantization constants (scales, nested scales, offset)."""
        return 8.0 * (self.total_bytes - self.codes_bytes) / self.numel

    def __add__(self, other: StorageReport) -> StorageReport:
        return StorageReport(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other),
                                                     strict=True)))


def storage_report_for(
    shape: tuple[int, ...],
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> StorageReport:
    """The storage a tensor of ``shape`` would take, without quantizing anything.

    ``quant_type`` may also be "bf16", "float16" or "float32" for an unquantized tensor.

    Args:
      shape: the tensor's shape.
      quant_type: ``"nf4"``, ``"fp4"``, ``"int8"``, ``"bf16"``, ``"float16"`` or ``"float32"``.
      blocksize: values per quantization block.
      double_quant: whether the scales are double-quantized.
      nested_blocksize: scales per double-quantization block.

    Returns:
      A :class:`StorageReport`.
    """
    numel = math.prod(shape)
    bits = _CODE_BITS[quant_type]
    if bits >= 16:
        return StorageReport(numel, numel * bits // 8, 0, 0, 0)
    codes = (numel * bits + 7) // 8
    num_blocks = -(-numel // blocksize)
    if double_quant:
        return StorageReport(numel, codes, num_blocks, 4 * -(-num_blocks // nested_blocksize), 4)
    return StorageReport(numel, codes, 4 * num_blocks, 0, 0)


def storage_report(qt: QuantizedTensor) -> StorageReport:
    """The storage ``qt`` actually takes, from its arrays' sizes.

    Args:
      qt: the quantized tensor.

    Returns:
      A :class:`StorageReport`.
    """

    def nbytes(a) -> int:
        return 0 if a is None else int(a.size) * a.dtype.itemsize

    return StorageReport(qt.numel, nbytes(qt.codes), nbytes(qt.scales), nbytes(qt.nested_scales), nbytes(qt.offset))
