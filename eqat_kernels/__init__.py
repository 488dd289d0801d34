"""eqat_kernels: packed int2/3/4 weights, their kernels and QuantLinear. Knows nothing of models or training."""
from .linear import QuantLinear, compute_path
from .swap import pack_all, quantize_linears, replace_module
from .packing import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from .spec import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantSpec

__all__ = ["QuantLinear", "compute_path", "QuantSpec", "quantize_linears", "pack_all", "replace_module", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES",
           "pack_qweight", "pack_qzeros", "unpack_qweight", "unpack_qzeros"]
