"""Quantization from scratch: number formats, integer quantization with real bit-packing, NF4 with
double quantization, outlier handling (LLM.int8, SmoothQuant), GPTQ and AWQ.

One module per concern: `formats` (number formats, bit-packing, round-to-nearest, QuantLinear and the
module swaps), `nf4`, `gptq_awq` (calibrated, layer by layer) and `outliers` (LLM.int8, SmoothQuant).
"""

from ..core import LINEAR_NAMES, capture_layer_inputs, decoder_linears
from .formats import (SUPPORTED_BITS, Int8TiedEmbedding, QuantizedWeight, QuantLinear, EmbedView, HeadView,
                      check_bits, check_group_size, dtype_summary, fake_quantize, int8_rowwise, pack_bits, pack_int4,
                      quant_params, quantize_codes, quantize_linears_rtn, quantize_per_tensor,
                      quantize_tied_embedding_int8, quantize_weight, replace_tied_table, restore_modules, swap_modules,
                      unpack_bits, unpack_int4)
from .gptq_awq import (GPTQ_ORDERS, act_order, check_gptq_order, awq_search_scale, sweep_plan, collect_linear_inputs, gptq_options, gptq_quantize, hessian, inverse_hessian_factor,
                       obs_sweep_reference, quantize_model_layerwise, shared_hessians)
from .nf4 import (DQ_BLOCK, NF4_CODEBOOK, NF4Linear, NF4Tensor, dequantize_absmax_int8, dequantize_nf4, nearest_code,
                  nf4_codebook_from_normal, quantize_absmax_int8, quantize_linears_nf4, quantize_nf4)
from .outliers import Int8MixedLinear, W8A8Linear, activation_absmax, outlier_columns, smoothing_scale

__all__ = [
    "LINEAR_NAMES", "capture_layer_inputs", "decoder_linears", "SUPPORTED_BITS", "dtype_summary", "check_bits",
    "check_group_size", "pack_bits", "unpack_bits", "pack_int4", "unpack_int4", "int8_rowwise", "QuantizedWeight",
    "quant_params", "quantize_codes", "quantize_weight", "Int8TiedEmbedding", "EmbedView", "HeadView",
    "replace_tied_table", "quantize_tied_embedding_int8", "quantize_per_tensor", "fake_quantize", "QuantLinear",
    "swap_modules", "restore_modules", "quantize_linears_rtn", "nf4_codebook_from_normal", "NF4_CODEBOOK",
    "nearest_code", "NF4Tensor", "DQ_BLOCK", "quantize_absmax_int8", "dequantize_absmax_int8", "quantize_nf4",
    "dequantize_nf4", "NF4Linear", "quantize_linears_nf4", "collect_linear_inputs", "hessian", "shared_hessians",
    "inverse_hessian_factor", "obs_sweep_reference", "act_order", "sweep_plan", "GPTQ_ORDERS", "check_gptq_order", "gptq_quantize", "gptq_options", "awq_search_scale", "quantize_model_layerwise", "outlier_columns",
    "Int8MixedLinear", "smoothing_scale", "W8A8Linear", "activation_absmax",
]
