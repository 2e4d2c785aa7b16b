"""Approximate-multiplier convolutions for layer-sensitivity studies (see conv.py)."""

from __future__ import annotations

from workers.approx.conv import approx_conv2d, auto_method, output_shape
from workers.approx.multipliers import MULTIPLIERS, ProductTable, load_table, table_by_name
from workers.approx.quant import FIXED_SCALES, dequantize, quantize, scale_for
from workers.approx.reference import direct_conv2d, direct_conv2d_tensors
from workers.approx.surgery import ApproxConv2d, LayerInfo, conv_layers, swap_layer, trace_macs

__all__ = [
    "FIXED_SCALES",
    "MULTIPLIERS",
    "ApproxConv2d",
    "LayerInfo",
    "ProductTable",
    "approx_conv2d",
    "auto_method",
    "conv_layers",
    "dequantize",
    "direct_conv2d",
    "direct_conv2d_tensors",
    "load_table",
    "output_shape",
    "quantize",
    "scale_for",
    "swap_layer",
    "table_by_name",
    "trace_macs",
]
