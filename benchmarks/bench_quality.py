"""Accuracy and size of DSConv2d.from_float against the float conv, at 2..8 bits.

Relative error = ||y_dsconv - y_float|| / ||y_float|| on post-SiLU feature maps with spatial
correlation (the inputs YOLO convs see), with 8-bit BFP activations; bytes are those of the
layer's saved state_dict (torch.save) against the fp32 nn.Conv2d's.

    python benchmarks/bench_quality.py [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import dump_json, print_table  # noqa: E402

from dsconv_ext import DSConv2d  # noqa: E402


def features(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, c, h, w, generator=g), 3, 1, 1) * 3
    return F.silu(x + torch.randn(n, c, 1, 1, generator=g))


def saved_bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    layers = [
        ("3x3 64->64", nn.Conv2d(64, 64, 3, 1, 1)),
        ("3x3 128->128 s2", nn.Conv2d(128, 128, 3, 2, 1)),
        ("1x1 256->256", nn.Conv2d(256, 256, 1)),
    ]
    rows = []
    with torch.no_grad():
        for name, conv in layers:
            x = features(2, conv.in_channels, 32, 32)
            y = conv(x)
            row = {"layer": name, "fp32_bytes": saved_bytes(conv)}
            for block in (32, 8):
                for bits in range(8, 1, -1):
                    m = DSConv2d.from_float(conv, bits=bits, block_size=block)
                    err = ((m(x) - y).norm() / y.norm()).item()
                    row[f"err_b{block}_{bits}bit_%"] = 100 * err
                    if block == 32:
                        row[f"bytes_{bits}bit"] = saved_bytes(m)
            rows.append(row)
    cols = ["layer"] + [f"err_b32_{b}bit_%" for b in range(8, 1, -1)]
    print("Relative output error (%), block_size 32, act_bits 8:")
    print_table(rows, cols)
    print("\nRelative output error (%), block_size 8, act_bits 8:")
    print_table(rows, ["layer"] + [f"err_b8_{b}bit_%" for b in range(8, 1, -1)])
    print("\nSaved bytes per layer (state_dict, block_size 32):")
    print_table(rows, ["layer", "fp32_bytes"] + [f"bytes_{b}bit" for b in (8, 4, 3, 2)])
    if args.json:
        dump_json(args.json, rows)


if __name__ == "__main__":
    main()
