"""nn.Modules of dsconv_ext."""

from .dsconv import FORMAT_VERSION, DSConv, DSConv2d, DSConvFormatError, autopad

__all__ = ["FORMAT_VERSION", "DSConv", "DSConv2d", "DSConvFormatError", "autopad"]
