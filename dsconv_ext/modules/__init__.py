"""nn.Modules of dsconv_ext."""

from .dsconv import FORMAT_VERSION, DSConv, DSConv2d, DSConvFormatError, autopad
from .pooling import NearestUpsample, SeparableMaxPool2d

__all__ = [
    "FORMAT_VERSION",
    "DSConv",
    "DSConv2d",
    "DSConvFormatError",
    "NearestUpsample",
    "SeparableMaxPool2d",
    "autopad",
]
