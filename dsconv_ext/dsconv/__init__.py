"""The DSConv operator: reference (``naive``), PyTorch fallback and argument checks."""

from .checks import check_dsconv2d_args
from .fallback import dsconv2d_fallback
from .naive import dsconv2d_reference

__all__ = ["check_dsconv2d_args", "dsconv2d_fallback", "dsconv2d_reference"]
