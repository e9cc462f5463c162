"""dsconv_ext: DSConv (int8 distribution-shifting convolution) and fused BiLevelRoutingAttention.

One home per op:

- :mod:`dsconv_ext.dsconv`: DSConv's reference, quantisation primitives, argument checks,
  PyTorch fallback, compiled-kernel bindings and modules (:func:`dsconv2d`, :class:`DSConv2d`).
- :mod:`dsconv_ext.bra`: BiLevelRoutingAttention's reference, PyTorch path, Triton kernels and
  module.
- :mod:`dsconv_ext.yolo`: the Ultralytics YOLO11 integration (registration, blocks,
  :func:`quantize` and checkpoint conversion, stand-ins for YOLO layers).
"""

from __future__ import annotations

import importlib

from . import _compat
from .dsconv import (
    FORMAT_VERSION,
    DSConv,
    DSConv2d,
    DSConvFormatError,
    dsconv2d,
    dsconv2d_backend,
    dsconv2d_fallback,
    dsconv2d_reference,
    dsconv_backend_report,
    quant_primitives,
)

__version__ = "0.1.0"

# Resolved on first access so that `import dsconv_ext` stays light (no Triton, no ultralytics).
_LAZY = {
    "BiLevelRoutingAttention": "dsconv_ext.bra",
    "TopkRouting": "dsconv_ext.bra",
    "KVGather": "dsconv_ext.bra",
    "QKVLinear": "dsconv_ext.bra",
    "bra_backend_report": "dsconv_ext.bra",
    "quantize": "dsconv_ext.yolo.convert",
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


# Checkpoints pickled by earlier releases name classes by their old module paths.
_compat.install()

# Register the YOLO modules with ultralytics when (if) it is imported: cheap, never imports
# ultralytics itself. DSCONV_EXT_YOLO=0 opts out.
from .yolo import autoregister as _yolo_autoregister  # noqa: E402

_yolo_autoregister()
