"""Int4 weight-only quantization: `QuantizedLinear` weights, `quantize_params` (RTN or AWQ), quantized
checkpoints (`save_quantized` / `load_quantized`), the accuracy report (perplexity, greedy agreement), and the
logical axes of quantized params for sharding."""

from internlm_jax.quant.axes import quantized_param_axes
from internlm_jax.quant.int4 import (
                                     DEFAULT_TARGETS,
                                     LAYER_TARGETS,
                                     LINEAR_AXES,
                                     QuantizedLinear,
                                     dequantize_params,
                                     int4_dot,
                                     params_nbytes,
                                     quantize_params,
                                     quantize_weight,
                                     set_matmul_impl,
)
from internlm_jax.quant.io import is_quantized_checkpoint, load_quantized, save_quantized
from internlm_jax.quant.report import (
                                     accuracy_report,
                                     format_report,
                                     greedy_agreement,
                                     perplexity,
                                     top1_agreement,
)

__all__ = ["DEFAULT_TARGETS", "LAYER_TARGETS", "LINEAR_AXES", "QuantizedLinear", "accuracy_report",
           "dequantize_params", "format_report", "greedy_agreement", "int4_dot", "is_quantized_checkpoint",
           "load_quantized", "params_nbytes", "perplexity", "quantize_params",
           "quantize_weight", "quantized_param_axes", "save_quantized", "set_matmul_impl", "top1_agreement"]
