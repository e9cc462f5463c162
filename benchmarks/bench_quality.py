"""Accuracy and size of DSConv2d.from_float against the float conv, at 2..8 bits.

Relative error = ||y_dsconv - y_float|| / ||y_float|| on post-SiLU feature maps with spatial
correlation (the inputs YOLO convs see), with 8-bit BFP activations; bytes are those of the
layer's saved state_dict (torch.save) against the fp32 nn.Conv2d's.

    python benchmarks/bench_quality.py [--json PATH]

With ``--weights best.pt`` (a trained ultralytics checkpoint) and ``--images DIR``, it also
captures the real input of every convolution of the fused model on those images and reports, per
layer, the 8-bit error of ``from_float`` against that conv, split into its weight part (dequantised
VQK, float activations) and its activation part (BFP activations, float weights).
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
from _timing import dump_json, environment, print_header, print_table  # noqa: E402

from dsconv_ext import DSConv2d  # noqa: E402

WEIGHT_ACT_BITS = ((8, 8), (7, 8), (8, 7), (7, 7))


def features(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, c, h, w, generator=g), 3, 1, 1) * 3
    return F.silu(x + torch.randn(n, c, 1, 1, generator=g))


def saved_bytes(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return 100 * ((y - ref).norm() / ref.norm()).item()


def captured_layer_errors(weights: str, images: str, count: int, block: int) -> list:
    """Per-conv 8-bit errors of a trained model on the inputs that conv really sees."""
    import glob

    import cv2
    from ultralytics import YOLO

    from dsconv_ext.dsconv.quant_primitives import bfp_dequantize, bfp_quantize, dequantize_weight

    model = YOLO(weights).model.float().eval().fuse()
    files = sorted(
        glob.glob(os.path.join(images, "*.jpg")) + glob.glob(os.path.join(images, "*.png"))
    )
    if not files:
        raise SystemExit(f"--images {images!r}: no .jpg or .png files")
    batch = [cv2.resize(cv2.imread(f), (640, 640))[:, :, ::-1].copy() for f in files[:count]]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in batch])
    inputs = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, n=n: inputs.setdefault(n, (mod, inp[0])) and None
        )
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        rows = []
        for name, (conv, xin) in inputs.items():
            ref = conv(xin)
            ds = DSConv2d.from_float(conv, bits=8, block_size=block)
            geo = (conv.stride, conv.padding, conv.dilation, conv.groups)
            groups_note = f" g{conv.groups}" if conv.groups > 1 else ""
            wq = dequantize_weight(ds.intweight, ds.alpha, block_size=block).float()
            mant, expo = bfp_quantize(xin, block_size=block, mant_bits=8, groups=conv.groups)
            xq = bfp_dequantize(mant, expo, block, conv.groups).float()
            rows.append({
                "layer": name.removeprefix("model."),
                "shape": "x".join(map(str, conv.weight.shape)) + groups_note,
                "err_%": relative_error(ds(xin), ref),
                "weight_part_%": relative_error(F.conv2d(xin, wq, conv.bias, *geo), ref),
                "act_part_%": relative_error(F.conv2d(xq, conv.weight, conv.bias, *geo), ref),
            })  # fmt: skip
    return rows


def summarise(rows: list) -> dict:
    errs = torch.tensor([r["err_%"] for r in rows])
    return {
        "layers": len(rows),
        "median_%": errs.median().item(),
        "max_%": errs.max().item(),
        "under_1%": f"{int((errs < 1).sum())}/{len(rows)}",
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--weights", help="trained ultralytics checkpoint: errors on captured inputs")
    p.add_argument("--images", help="directory of images to run --weights on")
    p.add_argument("--count", type=int, default=4, help="images from --images")
    args = p.parse_args(argv)
    env = environment()
    print_header("bench_quality", env)
    if args.weights:
        if not args.images:
            p.error("--weights needs --images")
        rows = captured_layer_errors(args.weights, args.images, args.count, 32)
        print(f"8-bit from_float on captured inputs of {args.weights}, block_size 32, act_bits 8:")
        print_table(rows, ["layer", "shape", "err_%", "weight_part_%", "act_part_%"])
        summary = summarise(rows)
        print_table([summary], list(summary))
        if args.json:
            dump_json(args.json, {"environment": env, "layers": rows, "summary": summary})
        return
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
            # One bit fewer for the weights or for the activations (CPUs without VNNI: a 7-bit
            # operand keeps vpmaddubsw's pair sums exact, docs/yolo.md).
            for bits, act_bits in WEIGHT_ACT_BITS:
                m = DSConv2d.from_float(conv, bits=bits, block_size=32, act_bits=act_bits)
                row[f"err_w{bits}a{act_bits}_%"] = 100 * ((m(x) - y).norm() / y.norm()).item()
            rows.append(row)
    cols = ["layer"] + [f"err_b32_{b}bit_%" for b in range(8, 1, -1)]
    print("Relative output error (%), block_size 32, act_bits 8:")
    print_table(rows, cols)
    print("\nRelative output error (%), block_size 8, act_bits 8:")
    print_table(rows, ["layer"] + [f"err_b8_{b}bit_%" for b in range(8, 1, -1)])
    print("\nRelative output error (%), block_size 32, weight bits w / activation bits a:")
    print_table(rows, ["layer"] + [f"err_w{w}a{a}_%" for w, a in WEIGHT_ACT_BITS])
    print("\nSaved bytes per layer (state_dict, block_size 32):")
    print_table(rows, ["layer", "fp32_bytes"] + [f"bytes_{b}bit" for b in (8, 4, 3, 2)])
    if args.json:
        dump_json(args.json, {"environment": env, "layers": rows})


if __name__ == "__main__":
    main()
