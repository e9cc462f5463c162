"""DSConv, the distribution-shifting convolution (Nascimento et al., ICCV 2019), in one place.

=====================  ==================================================================
``quant_primitives``   the numbers: VQK + KDS weight quantisation, block floating point
``naive``              the reference forward (float64, by the definition): the oracle
``checks``             argument validation and conv geometry shared by every entry point
``fallback``           the same maths vectorised in PyTorch, for any device
``ops``                bindings of the compiled kernels (csrc/), fake kernels, dispatch
``module``             ``DSConv2d`` (QAT and frozen int8 inference) and ``DSConv``
``gpu_checks``         problems and checks for the CUDA kernels (``selfcheck``)
=====================  ==================================================================
"""

from . import quant_primitives
from .checks import DSConvCall, check_dsconv2d_args
from .fallback import dsconv2d_fallback
from .module import FORMAT_VERSION, DSConv, DSConv2d, DSConvFormatError, autopad
from .naive import dsconv2d_reference
from .ops import dsconv2d, dsconv2d_backend, dsconv_backend_report

__all__ = [
    "FORMAT_VERSION",
    "DSConv",
    "DSConv2d",
    "DSConvCall",
    "DSConvFormatError",
    "autopad",
    "check_dsconv2d_args",
    "dsconv2d",
    "dsconv2d_backend",
    "dsconv2d_fallback",
    "dsconv2d_reference",
    "dsconv_backend_report",
    "quant_primitives",
]
