"""dsconv_ext: DSConv (int8 distribution-shifting convolution) and fused BiLevelRoutingAttention.

Quantisation primitives (pure functions): :mod:`dsconv_ext.quant_primitives`.
The DSConv op: :func:`dsconv2d` (kernel or fallback), :func:`dsconv2d_reference` (definition).
Modules: :class:`DSConv2d`, :class:`DSConv`, :class:`BiLevelRoutingAttention`.
"""

from __future__ import annotations

import importlib

from . import quant_primitives
from .dsconv import dsconv2d_fallback, dsconv2d_reference
from .modules import FORMAT_VERSION, DSConv, DSConv2d, DSConvFormatError
from .ops import dsconv2d, dsconv2d_backend, dsconv_backend_report

__version__ = "0.1.0"

# Resolved on first access so that `import dsconv_ext` stays light (no Triton, no ultralytics).
_LAZY = {
    "BiLevelRoutingAttention": "dsconv_ext.bra",
    "TopkRouting": "dsconv_ext.bra",
    "KVGather": "dsconv_ext.bra",
    "QKVLinear": "dsconv_ext.bra",
    "bra_backend_report": "dsconv_ext.bra",
    "quantize": "dsconv_ext.convert",
}

__all__ = [
    "FORMAT_VERSION",
    "DSConv",
    "DSConv2d",
    "DSConvFormatError",
    "dsconv2d",
    "dsconv2d_backend",
    "dsconv2d_fallback",
    "dsconv2d_reference",
    "dsconv_backend_report",
    "quant_primitives",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsconv_ext' has no attribute {name!r}")


# Register the YOLO modules with ultralytics when (if) it is imported: cheap, never imports
# ultralytics itself. DSCONV_EXT_YOLO=0 opts out.
from .yolo import autoregister as _yolo_autoregister  # noqa: E402

_yolo_autoregister()
