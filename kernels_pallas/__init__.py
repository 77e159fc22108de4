"""Pallas kernels (TPU Mosaic and GPU Triton variants), each beside its pure-JAX reference:
flash attention (forward + backward), paged decode attention, int4 weight-only matmul."""

from kernels_pallas.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from kernels_pallas.int4_matmul import (
    Int4Weight,
    dequantize_int4,
    int4_matmul,
    int4_matmul_reference,
    quantize_int4,
)
from kernels_pallas.paged_attention import paged_attention, paged_attention_reference

__all__ = [
    "BlockSizes",
    "Int4Weight",
    "dequantize_int4",
    "flash_attention",
    "flash_attention_reference",
    "int4_matmul",
    "int4_matmul_reference",
    "paged_attention",
    "paged_attention_reference",
    "quantize_int4",
]
