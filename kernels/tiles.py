"""Tile shapes per problem size class, for the Pallas-Triton kernels.

Three classes by the number of activation rows ``M`` (tokens):

* ``decode`` (M <= 16): memory-bound. One 16-row tile (the smallest a tensor-core ``dot``
  takes) covers every token; narrow weight tiles and a split of the reduction give enough CTAs
  to keep all SMs streaming the 4-bit weight.
* ``prefill`` / training (M >= 256): compute-bound. Large square-ish tiles (128 x 128, 8 warps),
  the usual Triton GEMM shape on Ampere/Hopper; each CTA dequantizes its weight tile once per
  ``block_m`` rows, so a tall tile amortizes the lookup.
* ``medium`` (16 < M < 256): in between, 32- or 64-row tiles.

The reduction is split (``split``: partial sums in float32, added by XLA, deterministic) only
while there are fewer tiles than SMs, and never so much that the partial sums cost more than a
quarter of the weight's bytes. These are starting points, not tuned values: no GPU was available
when they were chosen (see BENCHMARKS.md); every kernel takes an explicit config to override them.
"""

from __future__ import annotations

import dataclasses

import jax
from qlora_jax.kernels.common import LOOKUPS, largest_pow2_divisor, pow2_ceil, pow2_floor

__all__ = [
    "DECODE_MAX_M",
    "PREFILL_MIN_M",
    "DEFAULT_NUM_SMS",
    "MatmulTiles",
    "DequantTiles",
    "size_class",
    "matmul_tiles",
    "matmul_grad_tiles",
    "dequantize_tiles",
    "quantize_tiles",
    "device_num_sms",
    "reduction_split",
]

DECODE_MAX_M = 16
PREFILL_MIN_M = 256
# H100 SXM; used when no GPU is attached (interpret mode, lowering for export).
DEFAULT_NUM_SMS = 132


@dataclasses.dataclass(frozen=True)
class MatmulTiles:
    """Tile shape of a fused dequant-matmul kernel.

    ``block_m``: activation rows per tile. ``block_out``: output columns per tile (weight rows
    ``N`` in the forward, input features ``K`` in the input gradient). ``block_red``: reduction
    step (``K`` in the forward, ``N`` in the gradient). ``split``: number of independent
    reduction chunks (float32 partial sums added afterwards). All are powers of two except split.
    ``lookup``: how codes become values, ``"gather"`` (16-entry table in L1) or ``"select"``
    (15-select tree, no memory traffic); which is faster is an open GPU measurement.
    """

    block_m: int
    block_out: int
    block_red: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    lookup: str = "gather"

    def __post_init__(self):
        _check_lookup(self.lookup)
        for name in ("block_m", "block_out", "block_red"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MatmulTiles.{name}={value}: must be a power of two >= 16 (Triton dot)")
        if self.split < 1:
            raise ValueError(f"MatmulTiles.split={self.split}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class DequantTiles:
    """Tile of an elementwise (de)quantization kernel: ``block_rows`` x ``block_cols`` elements;
    ``lookup`` as in :class:`MatmulTiles` (dequantization only)."""

    block_rows: int
    block_cols: int
    num_warps: int = 4
    lookup: str = "gather"

    def __post_init__(self):
        _check_lookup(self.lookup)
        for name in ("block_rows", "block_cols"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"DequantTiles.{name}={value}: must be a power of two")


def _check_lookup(lookup: str) -> None:
    if lookup not in LOOKUPS:
        raise ValueError(f"unknown lookup {lookup!r}; expected one of {LOOKUPS}")


def size_class(m: int) -> str:
    """``"decode"``, ``"medium"`` or ``"prefill"`` for ``m`` activation rows."""
    if m <= DECODE_MAX_M:
        return "decode"
    if m >= PREFILL_MIN_M:
        return "prefill"
    return "medium"


def device_num_sms() -> int:
    """SM count of the default device when it is a GPU, else :data:`DEFAULT_NUM_SMS`."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return DEFAULT_NUM_SMS
    if device.platform == "gpu":
        count = getattr(device, "core_count", None)
        if count:
            return int(count)
    return DEFAULT_NUM_SMS


def reduction_split(tiles: int, m: int, red_steps: int, red_size: int, num_sms: int) -> int:
    """Reduction split that fills ~2 waves of SMs without the partials outweighing the weight."""
    if tiles >= num_sms:
        return 1
    wanted = pow2_ceil(-(-2 * num_sms // tiles))
    # Partial sums: split * m * out * 8 bytes (write + read); weight: out * red / 2 bytes.
    by_traffic = max(1, red_size // (64 * max(m, 1)))
    by_steps = max(1, red_steps // 2)
    split = max(1, min(wanted, pow2_floor(by_traffic), pow2_floor(by_steps)))
    while red_steps % split:
        split //= 2
    return split


# Per size class: (block_m, num_warps, num_stages), the same in both directions; the forward's
# (block_out over N, preferred K-step); the input gradient's (preferred K-tile, N-step).
_CLASS_PROGRAM = {"decode": (16, 4, 4), "medium": (64, 4, 3), "prefill": (128, 8, 3)}
_FORWARD_TILE = {"decode": (32, 256), "medium": (64, 128), "prefill": (128, 64)}
_GRAD_TILE = {"decode": (128, 128), "medium": (128, 64), "prefill": (128, 64)}


def _program(m: int) -> tuple[str, int, int, int]:
    """``(size class, block_m, num_warps, num_stages)`` for ``m`` rows (32-row tiles up to M=32)."""
    cls = size_class(m)
    block_m, warps, stages = _CLASS_PROGRAM[cls]
    if cls == "medium" and m <= 32:
        block_m = 32
    return cls, block_m, warps, stages


def _k_tile(k: int, preferred: int) -> int:
    """The largest power of two dividing K up to ``preferred``; at least 16 (``tl.dot``'s minimum)."""
    tile = largest_pow2_divisor(k, preferred)
    if tile < 16:
        raise ValueError(f"K={k} has no power-of-two divisor >= 16: use the XLA path")
    return tile


def matmul_tiles(m: int, n: int, k: int, num_sms: int | None = None) -> MatmulTiles:
    """Tiles for ``y[M, N] = x[M, K] @ dequant(W[N, K]).T`` (the forward).

    The K-step is the largest power of two dividing K up to the class's preference, so it nests
    with any (power-of-two) quantization block: several steps per block or several blocks per step.
    """
    num_sms = num_sms or device_num_sms()
    cls, block_m, warps, stages = _program(m)
    block_out, preferred_k = _FORWARD_TILE[cls]
    block_red = _k_tile(k, preferred_k)
    block_out = min(block_out, max(16, pow2_ceil(n)))
    tiles = -(-m // block_m) * -(-n // block_out)
    split = reduction_split(tiles, m, k // block_red, k, num_sms)
    return MatmulTiles(block_m, block_out, block_red, split, warps, stages)


def matmul_grad_tiles(m: int, n: int, k: int, num_sms: int | None = None) -> MatmulTiles:
    """Tiles for the input gradient ``dx[M, K] = dy[M, N] @ dequant(W[N, K])``."""
    num_sms = num_sms or device_num_sms()
    cls, block_m, warps, stages = _program(m)
    preferred_out, block_red = _GRAD_TILE[cls]
    block_out = _k_tile(k, preferred_out)
    block_red = min(block_red, max(16, pow2_ceil(n)))
    red_steps = -(-n // block_red)
    tiles = -(-m // block_m) * (k // block_out)
    split = reduction_split(tiles, m, red_steps, n, num_sms)
    return MatmulTiles(block_m, block_out, block_red, split, warps, stages)


def dequantize_tiles(n: int, k: int) -> DequantTiles:
    """Tiles for dequantizing ``W[N, K]``: 8K elements per CTA, 256 columns where K allows."""
    cols = largest_pow2_divisor(k, 256)
    rows = min(pow2_ceil(n), max(1, 8192 // cols))
    return DequantTiles(rows, cols)


def quantize_tiles(n: int, k: int, blocksize: int) -> DequantTiles:
    """Tiles for quantizing ``W[N, K]``: whole quantization blocks, ~4K elements per CTA."""
    cols = max(blocksize, largest_pow2_divisor(k, 256))
    rows = min(pow2_ceil(n), max(1, 4096 // cols))
    return DequantTiles(rows, cols)
