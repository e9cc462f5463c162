"""Conv layer shapes of YOLO11 at 640x640, batch 1, for the conv benchmarks.

``yolo11_conv_shapes(scale, kernel)`` lists every ``nn.Conv2d`` with a ``kernel`` x ``kernel``
kernel in ``yolo11{scale}.yaml``, in forward order, with the size of its input. The list was
generated with ultralytics 8.4 (``python benchmarks/conv_shapes.py --regenerate``, which builds
the models from their YAML, offline, and records the inputs with forward hooks) and is kept here
so that the benchmarks need no ultralytics; ``--check`` compares it with a fresh enumeration.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Tuple

__all__ = ["yolo11_conv_shapes", "enumerate_with_ultralytics"]

_FIELDS = ("c_in", "c_out", "k", "stride", "padding", "groups", "H", "W")

# (c_in, c_out, k, stride, padding, groups, H, W) of every Conv2d, in forward order.
_SHAPES: Dict[str, List[Tuple[int, ...]]] = {
    "n": [
        (3, 16, 3, 2, 1, 1, 640, 640),
        (16, 32, 3, 2, 1, 1, 320, 320),
        (32, 32, 1, 1, 0, 1, 160, 160),
        (16, 8, 3, 1, 1, 1, 160, 160),
        (8, 16, 3, 1, 1, 1, 160, 160),
        (48, 64, 1, 1, 0, 1, 160, 160),
        (64, 64, 3, 2, 1, 1, 160, 160),
        (64, 64, 1, 1, 0, 1, 80, 80),
        (32, 16, 3, 1, 1, 1, 80, 80),
        (16, 32, 3, 1, 1, 1, 80, 80),
        (96, 128, 1, 1, 0, 1, 80, 80),
        (128, 128, 3, 2, 1, 1, 80, 80),
        (128, 128, 1, 1, 0, 1, 40, 40),
        (64, 32, 1, 1, 0, 1, 40, 40),
        (32, 32, 3, 1, 1, 1, 40, 40),
        (32, 32, 3, 1, 1, 1, 40, 40),
        (32, 32, 3, 1, 1, 1, 40, 40),
        (32, 32, 3, 1, 1, 1, 40, 40),
        (64, 32, 1, 1, 0, 1, 40, 40),
        (64, 64, 1, 1, 0, 1, 40, 40),
        (192, 128, 1, 1, 0, 1, 40, 40),
        (128, 256, 3, 2, 1, 1, 40, 40),
        (256, 256, 1, 1, 0, 1, 20, 20),
        (128, 64, 1, 1, 0, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (128, 64, 1, 1, 0, 1, 20, 20),
        (128, 128, 1, 1, 0, 1, 20, 20),
        (384, 256, 1, 1, 0, 1, 20, 20),
        (256, 128, 1, 1, 0, 1, 20, 20),
        (512, 256, 1, 1, 0, 1, 20, 20),
        (256, 256, 1, 1, 0, 1, 20, 20),
        (128, 256, 1, 1, 0, 1, 20, 20),
        (128, 128, 3, 1, 1, 128, 20, 20),
        (128, 128, 1, 1, 0, 1, 20, 20),
        (128, 256, 1, 1, 0, 1, 20, 20),
        (256, 128, 1, 1, 0, 1, 20, 20),
        (256, 256, 1, 1, 0, 1, 20, 20),
        (384, 128, 1, 1, 0, 1, 40, 40),
        (64, 32, 3, 1, 1, 1, 40, 40),
        (32, 64, 3, 1, 1, 1, 40, 40),
        (192, 128, 1, 1, 0, 1, 40, 40),
        (256, 64, 1, 1, 0, 1, 80, 80),
        (32, 16, 3, 1, 1, 1, 80, 80),
        (16, 32, 3, 1, 1, 1, 80, 80),
        (96, 64, 1, 1, 0, 1, 80, 80),
        (64, 64, 3, 2, 1, 1, 80, 80),
        (192, 128, 1, 1, 0, 1, 40, 40),
        (64, 32, 3, 1, 1, 1, 40, 40),
        (32, 64, 3, 1, 1, 1, 40, 40),
        (192, 128, 1, 1, 0, 1, 40, 40),
        (128, 128, 3, 2, 1, 1, 40, 40),
        (384, 256, 1, 1, 0, 1, 20, 20),
        (128, 64, 1, 1, 0, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (128, 64, 1, 1, 0, 1, 20, 20),
        (128, 128, 1, 1, 0, 1, 20, 20),
        (384, 256, 1, 1, 0, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 80, 80),
        (64, 64, 3, 1, 1, 1, 80, 80),
        (64, 64, 1, 1, 0, 1, 80, 80),
        (128, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 1, 1, 0, 1, 40, 40),
        (256, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 1, 1, 0, 1, 20, 20),
        (64, 64, 3, 1, 1, 64, 80, 80),
        (64, 80, 1, 1, 0, 1, 80, 80),
        (80, 80, 3, 1, 1, 80, 80, 80),
        (80, 80, 1, 1, 0, 1, 80, 80),
        (80, 80, 1, 1, 0, 1, 80, 80),
        (128, 128, 3, 1, 1, 128, 40, 40),
        (128, 80, 1, 1, 0, 1, 40, 40),
        (80, 80, 3, 1, 1, 80, 40, 40),
        (80, 80, 1, 1, 0, 1, 40, 40),
        (80, 80, 1, 1, 0, 1, 40, 40),
        (256, 256, 3, 1, 1, 256, 20, 20),
        (256, 80, 1, 1, 0, 1, 20, 20),
        (80, 80, 3, 1, 1, 80, 20, 20),
        (80, 80, 1, 1, 0, 1, 20, 20),
        (80, 80, 1, 1, 0, 1, 20, 20),
        (16, 1, 1, 1, 0, 1, 4, 8400),
    ],
    "s": [
        (3, 32, 3, 2, 1, 1, 640, 640),
        (32, 64, 3, 2, 1, 1, 320, 320),
        (64, 64, 1, 1, 0, 1, 160, 160),
        (32, 16, 3, 1, 1, 1, 160, 160),
        (16, 32, 3, 1, 1, 1, 160, 160),
        (96, 128, 1, 1, 0, 1, 160, 160),
        (128, 128, 3, 2, 1, 1, 160, 160),
        (128, 128, 1, 1, 0, 1, 80, 80),
        (64, 32, 3, 1, 1, 1, 80, 80),
        (32, 64, 3, 1, 1, 1, 80, 80),
        (192, 256, 1, 1, 0, 1, 80, 80),
        (256, 256, 3, 2, 1, 1, 80, 80),
        (256, 256, 1, 1, 0, 1, 40, 40),
        (128, 64, 1, 1, 0, 1, 40, 40),
        (64, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 3, 1, 1, 1, 40, 40),
        (128, 64, 1, 1, 0, 1, 40, 40),
        (128, 128, 1, 1, 0, 1, 40, 40),
        (384, 256, 1, 1, 0, 1, 40, 40),
        (256, 512, 3, 2, 1, 1, 40, 40),
        (512, 512, 1, 1, 0, 1, 20, 20),
        (256, 128, 1, 1, 0, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (256, 128, 1, 1, 0, 1, 20, 20),
        (256, 256, 1, 1, 0, 1, 20, 20),
        (768, 512, 1, 1, 0, 1, 20, 20),
        (512, 256, 1, 1, 0, 1, 20, 20),
        (1024, 512, 1, 1, 0, 1, 20, 20),
        (512, 512, 1, 1, 0, 1, 20, 20),
        (256, 512, 1, 1, 0, 1, 20, 20),
        (256, 256, 3, 1, 1, 256, 20, 20),
        (256, 256, 1, 1, 0, 1, 20, 20),
        (256, 512, 1, 1, 0, 1, 20, 20),
        (512, 256, 1, 1, 0, 1, 20, 20),
        (512, 512, 1, 1, 0, 1, 20, 20),
        (768, 256, 1, 1, 0, 1, 40, 40),
        (128, 64, 3, 1, 1, 1, 40, 40),
        (64, 128, 3, 1, 1, 1, 40, 40),
        (384, 256, 1, 1, 0, 1, 40, 40),
        (512, 128, 1, 1, 0, 1, 80, 80),
        (64, 32, 3, 1, 1, 1, 80, 80),
        (32, 64, 3, 1, 1, 1, 80, 80),
        (192, 128, 1, 1, 0, 1, 80, 80),
        (128, 128, 3, 2, 1, 1, 80, 80),
        (384, 256, 1, 1, 0, 1, 40, 40),
        (128, 64, 3, 1, 1, 1, 40, 40),
        (64, 128, 3, 1, 1, 1, 40, 40),
        (384, 256, 1, 1, 0, 1, 40, 40),
        (256, 256, 3, 2, 1, 1, 40, 40),
        (768, 512, 1, 1, 0, 1, 20, 20),
        (256, 128, 1, 1, 0, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (128, 128, 3, 1, 1, 1, 20, 20),
        (256, 128, 1, 1, 0, 1, 20, 20),
        (256, 256, 1, 1, 0, 1, 20, 20),
        (768, 512, 1, 1, 0, 1, 20, 20),
        (128, 64, 3, 1, 1, 1, 80, 80),
        (64, 64, 3, 1, 1, 1, 80, 80),
        (64, 64, 1, 1, 0, 1, 80, 80),
        (256, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 3, 1, 1, 1, 40, 40),
        (64, 64, 1, 1, 0, 1, 40, 40),
        (512, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 3, 1, 1, 1, 20, 20),
        (64, 64, 1, 1, 0, 1, 20, 20),
        (128, 128, 3, 1, 1, 128, 80, 80),
        (128, 128, 1, 1, 0, 1, 80, 80),
        (128, 128, 3, 1, 1, 128, 80, 80),
        (128, 128, 1, 1, 0, 1, 80, 80),
        (128, 80, 1, 1, 0, 1, 80, 80),
        (256, 256, 3, 1, 1, 256, 40, 40),
        (256, 128, 1, 1, 0, 1, 40, 40),
        (128, 128, 3, 1, 1, 128, 40, 40),
        (128, 128, 1, 1, 0, 1, 40, 40),
        (128, 80, 1, 1, 0, 1, 40, 40),
        (512, 512, 3, 1, 1, 512, 20, 20),
        (512, 128, 1, 1, 0, 1, 20, 20),
        (128, 128, 3, 1, 1, 128, 20, 20),
        (128, 128, 1, 1, 0, 1, 20, 20),
        (128, 80, 1, 1, 0, 1, 20, 20),
        (16, 1, 1, 1, 0, 1, 4, 8400),
    ],
}


def yolo11_conv_shapes(scale: str, kernel: int, unique: bool = False) -> List[Dict[str, int]]:
    """Conv layers of YOLO11-``scale`` with a ``kernel`` x ``kernel`` kernel.

    Args:
        scale: model scale, "n" or "s".
        kernel: kernel size to select (3 or 1).
        unique: drop repeated shapes (keeps the first occurrence); by default every layer is
            listed, so a geometric mean over the list weights shapes as the model does.

    Returns:
        One dict per layer: c_in, c_out, k, stride, padding, groups, H, W (input size).
    """
    if scale not in _SHAPES:
        raise ValueError(f"scale must be one of {sorted(_SHAPES)}, got {scale!r}")
    rows = [dict(zip(_FIELDS, s)) for s in _SHAPES[scale] if s[2] == kernel]
    if unique:
        seen, kept = set(), []
        for r in rows:
            key = tuple(r.values())
            if key not in seen:
                seen.add(key)
                kept.append(r)
        rows = kept
    return rows


def enumerate_with_ultralytics(scale: str) -> List[Tuple[int, ...]]:
    """Every Conv2d of yolo11{scale}.yaml with its input size at 640x640 (needs ultralytics)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics import YOLO

    model = YOLO(f"yolo11{scale}.yaml").model.eval()
    rows: List[Tuple[int, ...]] = []

    def hook(mod, inputs, _out):
        h, w = inputs[0].shape[-2:]
        rows.append(
            (
                mod.in_channels,
                mod.out_channels,
                mod.kernel_size[0],
                mod.stride[0],
                mod.padding[0],
                mod.groups,
                int(h),
                int(w),
            )
        )

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            if mod.kernel_size[0] != mod.kernel_size[1] or mod.dilation != (1, 1):
                raise RuntimeError(f"unexpected conv {mod}: the table assumes square, undilated")
            mod.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 640, 640))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regenerate", action="store_true", help="print the table from ultralytics")
    p.add_argument("--check", action="store_true", help="compare the table with ultralytics")
    args = p.parse_args()
    if args.regenerate:
        for scale in _SHAPES:
            print(f'    "{scale}": [')
            for row in enumerate_with_ultralytics(scale):
                print(f"        {row!r},")
            print("    ],")
        return 0
    if args.check:
        bad = [s for s in _SHAPES if enumerate_with_ultralytics(s) != _SHAPES[s]]
        print("table matches ultralytics" if not bad else f"table differs for scales {bad}")
        return 1 if bad else 0
    for scale in _SHAPES:
        for r in yolo11_conv_shapes(scale, 3):
            print(scale, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
