"""Former home of the ONNX export of DSConv layers, now :mod:`dsconv_ext.yolo.export` (one
exporting forward for ONNX and OpenVINO). These names stay for code that imported them."""

from __future__ import annotations

import torch

from .export import StandardOpsDSConv, export_mode, wrap_export

__all__ = ["dsconv2d_onnx", "export_mode", "wrap_export_onnx"]


def wrap_export_onnx(original):
    """Wrap ``Exporter.export_onnx`` to export DSConv layers through :func:`export_mode`."""
    return wrap_export(original, "export_onnx")


def dsconv2d_onnx(m, x: torch.Tensor) -> torch.Tensor:
    """Forward of DSConv2d ``m`` (frozen or QAT) in standard operators (builds the constants on
    every call: use :func:`export_mode` to export a model)."""
    return StandardOpsDSConv(m)(x)
