"""DSConv CUDA kernel vs cuDNN (F.conv2d fp16, bf16 and fp32) and torch._int_mm on an im2col.

On the conv layers of YOLO11 at 640 px (``conv_shapes.py``), batch 1 / 16 / 64. Candidates are
timed interleaved (``_timing.time_interleaved``), each call running the op ``--inner`` times so
that the host-device synchronisation does not dominate small layers; the median per op is
reported in ms. Ratios are speed-ups of DSConv: ``x f16`` = cuDNN fp16 time / DSConv time.

* ``dsconv``: ``torch.ops.dsconv_ext.dsconv2d`` on float16 activations, float16 out, block 32,
  8-bit VQK and mantissas, KDS bias, bias and SiLU: everything included (BFP quantisation of the
  activations, weight repack, int8 GEMM, epilogue).
* ``dsconv bf16``: the same on bfloat16 activations, bfloat16 out.
* ``cudnn16`` / ``cudnnbf16`` / ``cudnn32``: ``F.conv2d`` with bias, float16 / bfloat16 /
  float32 (TF32 off), then SiLU.
* ``int_mm``: im2col of an int8 copy of the input (pad + unfold + copy) then ``torch._int_mm``
  with int32 out: an int8 GEMM's best case (no activation quantisation, no scales, no epilogue);
  grouped layers have none.

Weight bytes: fp32, and DSConv's int8 VQK plus its float32 alpha and KDS bias.

    python benchmarks/bench_conv_cuda.py                    # YOLO11n+s, 3x3 and 1x1, 1/16/64
    python benchmarks/bench_conv_cuda.py --scales n --kernels 3 --batches 16
    python benchmarks/bench_conv_cuda.py --json out.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (  # noqa: E402
    dump_json,
    environment,
    print_header,
    print_table,
    time_interleaved,
)

__all__ = ["cuda_rows", "COLUMNS", "summary"]

COLUMNS = [
    "layer",
    "batch",
    "cudnn32 ms",
    "cudnn16 ms",
    "cudnnbf16 ms",
    "int_mm ms",
    "dsconv ms",
    "dsconv bf16 ms",
    "x f16",
    "x bf16",
    "x f32",
    "x int_mm",
    "w fp32 KB",
    "w dsconv KB",
]


def _layer_name(s: Dict) -> str:
    g = f" g{s['groups']}" if s["groups"] > 1 else ""
    return f"{s['c_in']}->{s['c_out']} k{s['k']}s{s['stride']}{g} @{s['H']}x{s['W']}"


def _int_mm_candidate(x8: torch.Tensor, w8: torch.Tensor, s: Dict):
    """im2col (int8) + torch._int_mm, or None where it does not apply."""
    if s["groups"] != 1 or not hasattr(torch, "_int_mm"):
        return None
    k, st, p = s["k"], s["stride"], s["padding"]
    O, K = w8.shape[0], w8.shape[1] * k * k
    Kp, Op = -(-K // 8) * 8, -(-O // 8) * 8  # _int_mm wants K, N multiples of 8
    b = torch.zeros(Kp, Op, dtype=torch.int8, device=x8.device)
    b[:K, :O] = w8.reshape(O, K).t()

    def run():
        xp = F.pad(x8, (p, p, p, p))
        cols = xp.unfold(2, k, st).unfold(3, k, st)  # [N, C, Ho, Wo, k, k]
        a = cols.permute(0, 2, 3, 1, 4, 5).reshape(-1, K)
        if Kp != K:
            a = F.pad(a, (0, Kp - K))
        return torch._int_mm(a.contiguous(), b)

    try:
        if run().shape[0] <= 16:  # _int_mm needs more than 16 rows
            return None
    except RuntimeError as e:
        print(f"# torch._int_mm unavailable for {_layer_name(s)}: {e}", file=sys.stderr)
        return None
    return run


def _candidates(s: Dict, n: int, weights: Dict, block_size: int, have_kernel: bool, device: str):
    """Zero-argument callables, one op each, on fresh inputs of batch n."""
    x32 = torch.randn(n, s["c_in"], s["H"], s["W"], device=device)
    x16, xb16 = x32.half(), x32.bfloat16()
    conv = dict(stride=s["stride"], padding=s["padding"], groups=s["groups"])
    w32, b32, w16, b16 = (weights[k] for k in ("w32", "b32", "w16", "b16"))
    wb16, bb16 = w32.bfloat16(), b32.bfloat16()
    fns = {
        "cudnn32": lambda: F.silu(F.conv2d(x32, w32, b32, **conv)),
        "cudnn16": lambda: F.silu(F.conv2d(x16, w16, b16, **conv)),
        "cudnnbf16": lambda: F.silu(F.conv2d(xb16, wb16, bb16, **conv)),
    }
    x8 = (x32 * 32).round().clamp(-127, 127).to(torch.int8)
    int_mm = _int_mm_candidate(x8, weights["q"], s)
    if int_mm is not None:
        fns["int_mm"] = int_mm
    if have_kernel:
        args = (
            weights["q"], weights["alpha"], weights["kdsb"], None, None, b32,
            [s["stride"]] * 2, [s["padding"]] * 2, [1, 1], s["groups"], block_size, 8, True,
        )  # fmt: skip
        fns["dsconv"] = lambda: torch.ops.dsconv_ext.dsconv2d(x16, *args)
        fns["dsconv_bf16"] = lambda: torch.ops.dsconv_ext.dsconv2d(xb16, *args)
    return fns


def cuda_rows(
    shapes: Sequence[Dict],
    batches: Sequence[int] = (1, 16, 64),
    rounds: int = 20,
    inner: int = 10,
    block_size: int = 32,
    device: str = "cuda",
) -> List[Dict]:
    """One row per (layer shape, batch): median ms per op of each candidate, speed-ups, weights.

    shapes: dicts with c_in, c_out, k, stride, padding, groups, H, W (conv_shapes.py)."""
    from dsconv_ext import dsconv2d_backend
    from dsconv_ext.dsconv.quant_primitives import quantize_weight

    have_kernel = dsconv2d_backend(device) == "kernel"
    if not have_kernel:
        print("# no DSConv CUDA kernel in this build: DSConv columns left empty", file=sys.stderr)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        for s in shapes:
            g = torch.Generator().manual_seed(0)
            cg = s["c_in"] // s["groups"]
            w = torch.randn(s["c_out"], cg, s["k"], s["k"], generator=g)
            w /= math.sqrt(cg * s["k"] ** 2)
            bias = torch.randn(s["c_out"], generator=g)
            q, alpha, kdsb = quantize_weight(w, 8, block_size, kds_bias=True)
            weights = {
                "w32": w.to(device), "b32": bias.to(device), "w16": w.to(device).half(),
                "b16": bias.to(device).half(), "q": q.to(device), "alpha": alpha.to(device),
                "kdsb": kdsb.to(device),
            }  # fmt: skip
            wbytes = q.numel() + 4 * (alpha.numel() + kdsb.numel())
            for n in batches:
                fns = _candidates(s, n, weights, block_size, have_kernel, device)
                ms = time_interleaved(
                    {k: (lambda f=f: [f() for _ in range(inner)]) for k, f in fns.items()},
                    rounds=rounds,
                    device=device,
                )
                ms = {k: v / inner for k, v in ms.items()}
                row = {
                    "layer": _layer_name(s),
                    "k": s["k"],
                    "batch": n,
                    "cudnn32 ms": ms["cudnn32"],
                    "cudnn16 ms": ms["cudnn16"],
                    "cudnnbf16 ms": ms["cudnnbf16"],
                    "w fp32 KB": w.numel() * 4 / 1024,
                    "w dsconv KB": wbytes / 1024,
                }
                if "int_mm" in ms:
                    row["int_mm ms"] = ms["int_mm"]
                if "dsconv" in ms:
                    row["dsconv ms"] = ms["dsconv"]
                    row["x f16"] = ms["cudnn16"] / ms["dsconv"]
                    row["x f32"] = ms["cudnn32"] / ms["dsconv"]
                    row["dsconv bf16 ms"] = ms["dsconv_bf16"]
                    row["x bf16"] = ms["cudnnbf16"] / ms["dsconv_bf16"]
                    if "int_mm" in ms:
                        row["x int_mm"] = ms["int_mm"] / ms["dsconv"]
                rows.append(row)
                timings = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                print(f"# {row['layer']} batch {n}: {timings}", file=sys.stderr, flush=True)
                fns = None
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return rows


def summary(rows: List[Dict]) -> List[Dict]:
    """Geometric-mean speed-ups of DSConv per (kernel size, batch)."""
    out = []
    for k in sorted({r["k"] for r in rows}, reverse=True):
        for n in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["k"] == k and r["batch"] == n and "x f16" in r]
            if not sel:
                continue
            entry = {"kernel": f"{k}x{k}", "batch": n, "layers": len(sel)}
            for col in ("x f16", "x bf16", "x f32", "x int_mm"):
                vals = [r[col] for r in sel if r.get(col)]
                if vals:
                    entry[f"geomean {col}"] = math.exp(sum(map(math.log, vals)) / len(vals))
            out.append(entry)
    return out


def _unique(shapes: List[Dict]) -> List[Dict]:
    seen, out = set(), []
    for s in shapes:
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="n,s")
    p.add_argument("--kernels", default="3,1")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--inner", type=int, default=10, help="ops per timed call")
    p.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv_cuda: no CUDA device on this machine")
        return 0
    from conv_shapes import yolo11_conv_shapes

    shapes = _unique(
        [
            s
            for sc in args.scales.split(",")
            for k in (int(v) for v in args.kernels.split(","))
            for s in yolo11_conv_shapes(sc, k)
        ]
    )
    env = environment()
    print_header("bench_conv_cuda", env)
    if hasattr(torch.ops.dsconv_ext, "cuda_archs"):
        print(f"# DSConv CUDA kernels built for {torch.ops.dsconv_ext.cuda_archs()}")
    batches = [int(b) for b in args.batches.split(",")]
    rows = cuda_rows(shapes, batches, rounds=args.rounds, inner=args.inner)
    print_table(rows, COLUMNS)
    print()
    summ = summary(rows)
    if summ:
        print_table(summ, list(summ[0].keys()))
    if args.json:
        dump_json(args.json, {"env": env, "cuda": rows, "summary": summ})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
