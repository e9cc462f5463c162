"""DSConv kernel vs fp32 F.conv2d (oneDNN), torch.ao int8 conv and the PyTorch fallback.

On the 3x3 and 1x1 conv layers of YOLO11n and YOLO11s at 640 px, batch 1 and 8, on CPU (and on
CUDA with benchmarks/bench_conv_cuda.py when a GPU is present). Candidates are timed interleaved,
the median of many rounds is reported, and ratios are speed-ups over the named baseline:
``x fp32`` = F.conv2d fp32 time / DSConv time, ``x ao`` = torch.ao int8 conv time / DSConv time.

The torch.ao candidate times the quantized conv alone on an already-quantised input (its best
case: no quantise / dequantise of activations, no per-block shifts); DSConv times float in ->
float out including the BFP activation quantisation. Its engines are those PyTorch offers on
the CPU, each timed and the faster kept per layer (``ao_engine`` says which): ``x86`` (fbgemm
and oneDNN, PyTorch's default) and ``onednn`` on x86-64 (on AMD Zen 3 the ``onednn`` engine ran
yolo11n's 1x1 convs 1.05-1.5x faster than ``x86``), ``qnnpack`` and ``onednn`` on Arm;
``--ao-engine`` times one alone.

    python benchmarks/bench_conv.py                 # full CPU table
    python benchmarks/bench_conv.py --quick         # a few layers, batch 1
    python benchmarks/bench_conv.py --json out.json
    python benchmarks/bench_conv.py --compare-isa avx512_vnni   # on AMX: the VNNI tiles beside
    python benchmarks/bench_conv.py --bits 7 --compare-layout int16  # AVX2: byte vs int16 layout

``--bits`` sets the VQK width of the DSConv weights (8 by default). On the AVX2 path weights of
at most 7 bits take the byte layout (vpmaddubsw); ``--compare-layout int16`` times the int16-pair
layout beside it (``DSCONV_EXT_AVX2_LAYOUT=int16``). The torch.ao row stays 8-bit, but on CPUs
without VNNI its vpmaddubsw products saturate unless one side drops a bit (oneDNN halves the
weights, torch.ao's default x86 qconfig keeps activations to 7 bits), so ``--bits 7`` is
DSConv's exact equivalent there.

A second table times the float stem converted models keep (3 -> 16/32/64 channels, 3x3,
stride 2, then SiLU): the fused ``stem_conv2d`` op (``FastStemConv``) against F.conv2d + SiLU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import warnings

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
from conv_shapes import yolo11_conv_shapes  # noqa: E402

import dsconv_ext  # noqa: E402
from dsconv_ext.dsconv import dsconv2d_fallback  # noqa: E402
from dsconv_ext.dsconv.quant_primitives import pack_intweight, quantize_weight  # noqa: E402

# torch.ao's quantized engines per architecture: those timed (the faster kept per layer), then
# the fallbacks where a torch has none of them. x86 is PyTorch's default on x86-64 (fbgemm or
# oneDNN per op), qnnpack (XNNPACK / QNNPACK kernels) on Arm.
AO_ENGINES = {
    "x86": (("x86", "onednn"), ("fbgemm", "qnnpack")),
    "arm": (("qnnpack", "onednn"), ()),
}


def ao_engines(requested="auto", supported=None, machine=None):
    """The torch.ao engines to time: ``[requested]`` if this torch has it, for ``auto`` those of
    this architecture's it has (else its first fallback); [] if none."""
    supported = torch.backends.quantized.supported_engines if supported is None else supported
    if requested != "auto":
        return [requested] if requested in supported else []
    machine = (machine or platform.machine()).lower()
    arch = "arm" if machine in ("aarch64", "arm64") or machine.startswith("armv") else "x86"
    timed, fallbacks = AO_ENGINES[arch]
    have = [e for e in timed if e in supported]
    return have or [e for e in fallbacks if e in supported][:1]


def _ao_conv(w: torch.Tensor, s: dict, x: torch.Tensor, engine: str):
    """A torch.ao quantized conv on ``engine`` on a quantised copy of x, or None if unavailable."""
    try:
        import torch.ao.nn.quantized as nnq

        # Set before the weights are packed: they are packed for the engine in use.
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv = nnq.Conv2d(
                s["c_in"], s["c_out"], s["k"], s["stride"], s["padding"], groups=s["groups"]
            )
            scales = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
            qw = torch.quantize_per_channel(
                w, scales.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8
            )
            conv.set_weight_bias(qw, torch.zeros(w.shape[0]))
            conv.scale, conv.zero_point = float(x.abs().max() / 64), 64
            xq = torch.quantize_per_tensor(x, float(x.abs().max() / 127), 128, torch.quint8)
        return lambda: conv(xq)
    except Exception as e:  # removed or broken in this torch: say so in the table
        print(f"torch.ao int8 conv unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


# Any of these gives oneDNN exact 8-bit int8 products; without them it halves the weights.
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def _with_env(var: str, value: str, fn):
    """fn run with the environment variable var=value (the kernel reads DSCONV_EXT_CPU_ISA and
    DSCONV_EXT_AVX2_LAYOUT on every call)."""

    def call():
        old = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[var]
            else:
                os.environ[var] = old

    return call


def _on_isa(isa: str, fn):
    return _with_env("DSCONV_EXT_CPU_ISA", isa, fn)


def _unique(shapes):
    seen = {}
    for s in shapes:
        key = (
            s["c_in"],
            s["c_out"],
            s["k"],
            s["stride"],
            s["padding"],
            s["groups"],
            s["H"],
            s["W"],
        )
        if key in seen:
            seen[key]["count"] += 1
        else:
            seen[key] = dict(s, count=1)
    return list(seen.values())


def bench_cpu(
    scales, kernels, batches, rounds, with_fallback, quick, compare_isa=None, bits=8,
    compare_layout=None, ao="auto",
):  # fmt: skip
    rows = []
    backend = dsconv_ext.dsconv2d_backend("cpu")
    engines = ao_engines(ao)
    for scale in scales:
        for k in kernels:
            shapes = _unique(yolo11_conv_shapes(scale, k))
            if quick:
                shapes = shapes[:: max(1, len(shapes) // 4)]
            for batch in batches:
                for s in shapes:
                    g = torch.Generator().manual_seed(0)
                    x = F.silu(torch.randn(batch, s["c_in"], s["H"], s["W"], generator=g))
                    w = torch.randn(s["c_out"], s["c_in"] // s["groups"], k, k, generator=g)
                    w *= (2.0 / w[0].numel()) ** 0.5
                    q, alpha, _ = quantize_weight(w, bits, 32)
                    conv_args = (s["stride"], s["padding"], 1, s["groups"])
                    fns = {
                        "dsconv": lambda x=x, q=q, a=alpha, c=conv_args: dsconv_ext.dsconv2d(
                            x, q, a, None, None, None, None, *c, 32, 8
                        ),
                        "fp32": lambda x=x, w=w, c=conv_args: F.conv2d(x, w, None, *c),
                    }
                    if compare_isa:
                        # Both through the same environment switch (~2 us a call), so that the
                        # ratio is of the paths alone.
                        plain = fns["dsconv"]
                        fns["dsconv"] = _on_isa(os.environ.get("DSCONV_EXT_CPU_ISA", ""), plain)
                        fns["dsconv_alt"] = _on_isa(compare_isa, plain)
                    if compare_layout:
                        plain = fns["dsconv"]
                        var = "DSCONV_EXT_AVX2_LAYOUT"
                        fns["dsconv"] = _with_env(var, os.environ.get(var, "auto"), plain)
                        fns["dsconv_layout"] = _with_env(var, compare_layout, plain)
                    for engine in engines:
                        # (packed for its engine when made: each call runs on that engine)
                        conv = _ao_conv(w, s, x, engine)
                        if conv is not None:
                            fns[f"ao_{engine}"] = conv
                    if with_fallback and batch == 1:  # the slow fallback: batch 1 only
                        fns["fallback"] = lambda x=x, q=q, a=alpha, c=conv_args: dsconv2d_fallback(
                            x, q, a, None, None, None, None, *c, 32, 8
                        )
                    with torch.no_grad():
                        # Fewer rounds for the slow fallback: keep each row to a few seconds.
                        t = time_interleaved(
                            fns,
                            rounds=rounds if "fallback" not in fns else max(8, rounds // 3),
                            warmup=2,
                        )
                    ao_ms = {k[3:]: v for k, v in t.items() if k.startswith("ao_")}
                    if ao_ms:
                        t["ao_int8"] = min(ao_ms.values())
                    row = {
                        "scale": scale,
                        "k": k,
                        "batch": batch,
                        "layer": f"{s['c_in']}->{s['c_out']} s{s['stride']}"
                        + (f" g{s['groups']}" if s["groups"] > 1 else ""),
                        "HxW": f"{s['H']}x{s['W']}",
                        "count": s["count"],
                        "dsconv_ms": t["dsconv"],
                        "fp32_ms": t["fp32"],
                        "ao_int8_ms": t.get("ao_int8", float("nan")),
                        "ao_engine": min(ao_ms, key=ao_ms.get) if ao_ms else None,
                        "ao_ms_by_engine": ao_ms,
                        "fallback_ms": t.get("fallback", float("nan")),
                        "x_fp32": t["fp32"] / t["dsconv"],
                        "x_ao": t.get("ao_int8", float("nan")) / t["dsconv"],
                        "x_fallback": t.get("fallback", float("nan")) / t["dsconv"],
                        "alt_isa_ms": t.get("dsconv_alt", float("nan")),
                        "x_alt_isa": t.get("dsconv_alt", float("nan")) / t["dsconv"],
                        "alt_layout_ms": t.get("dsconv_layout", float("nan")),
                        "x_alt_layout": t.get("dsconv_layout", float("nan")) / t["dsconv"],
                        "bits": bits,
                        "w_fp32_B": w.numel() * 4,
                        "w_int8_B": q.numel() + alpha.numel() * 4,
                        "w_int4_B": pack_intweight(q.clamp(-8, 7), 4).numel() + alpha.numel() * 4,
                        "backend": backend,
                    }
                    rows.append(row)
                    print_table([row], COLUMNS) if os.environ.get("BENCH_VERBOSE") else None
    return rows


# Width of YOLO11's first conv per scale (3 RGB channels in, 3x3, stride 2).
STEM_CHANNELS = {"n": 16, "s": 32, "m": 64, "l": 64, "x": 96}


def bench_stem(scales, batches, rounds, size=640):
    """The float stem: ``stem_conv2d`` with the SiLU fused vs F.conv2d + SiLU (oneDNN)."""
    from dsconv_ext.yolo.fast_stem import kernel_is_faster

    if not kernel_is_faster():
        print("# float stem: no rows (the op is not used on this CPU path: oneDNN is faster)")
        return []
    rows = []
    for scale in scales:
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            x = torch.rand(batch, 3, size, size, generator=g)  # an image in [0, 1]
            o = STEM_CHANNELS[scale]
            w = torch.randn(o, 3, 3, 3, generator=g) * (2 / 27) ** 0.5
            b = torch.randn(o, generator=g) * 0.1
            fns = {
                "stem_op": lambda x=x, w=w, b=b: torch.ops.dsconv_ext.stem_conv2d(
                    x, w, b, [2, 2], [1, 1], True
                ),
                "fp32": lambda x=x, w=w, b=b: F.silu(F.conv2d(x, w, b, 2, 1), inplace=True),
            }
            with torch.no_grad():
                t = time_interleaved(fns, rounds=rounds, warmup=2)
            rows.append(
                {
                    "scale": scale,
                    "batch": batch,
                    "layer": f"3->{o} s2 + SiLU",
                    "HxW": f"{size}x{size}",
                    "stem_op_ms": t["stem_op"],
                    "fp32_silu_ms": t["fp32"],
                    "x_fp32": t["fp32"] / t["stem_op"],
                }
            )
    return rows


COLUMNS = [
    "scale",
    "k",
    "batch",
    "bits",
    "layer",
    "HxW",
    "count",
    "dsconv_ms",
    "fp32_ms",
    "ao_int8_ms",
    "fallback_ms",
    "x_fp32",
    "x_ao",
    "x_fallback",
    "alt_isa_ms",
    "x_alt_isa",
    "alt_layout_ms",
    "x_alt_layout",
    "w_fp32_B",
    "w_int8_B",
    "w_int4_B",
]


def geomean(vals):
    vals = [v for v in vals if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summary(rows):
    out = []
    for k in sorted({r["k"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            sel = [r for r in rows if r["k"] == k and r["batch"] == batch]
            if sel:
                out.append(
                    {
                        "k": k,
                        "batch": batch,
                        "layers": len(sel),
                        "geomean_x_fp32": geomean([r["x_fp32"] for r in sel]),
                        "geomean_x_ao": geomean([r["x_ao"] for r in sel]),
                        "geomean_x_fallback": geomean([r["x_fallback"] for r in sel]),
                        "geomean_x_alt_isa": geomean([r["x_alt_isa"] for r in sel]),
                        "geomean_x_alt_layout": geomean([r["x_alt_layout"] for r in sel]),
                    }
                )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="n,s")
    p.add_argument("--kernels", default="3,1")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-fallback", action="store_true", help="skip the slow PyTorch fallback")
    p.add_argument("--quick", action="store_true", help="a few layers, batch 1, 3x3 only")
    p.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    p.add_argument("--cuda", action="store_true", help="also the CUDA rows (needs a GPU)")
    p.add_argument("--no-stem", dest="stem", action="store_false", help="skip the stem table")
    p.add_argument(
        "--compare-isa",
        metavar="ISA",
        help="also time DSConv forced onto this CPU path (DSCONV_EXT_CPU_ISA: amx, avx512_vnni, "
        "avx2, scalar): columns alt_isa_ms and x_alt_isa (its time / the default path's)",
    )
    p.add_argument(
        "--bits", type=int, default=8, help="VQK width of the DSConv weights, 2..8 (default 8)"
    )
    p.add_argument(
        "--compare-layout",
        metavar="LAYOUT",
        choices=["int16"],
        help="also time DSConv with DSCONV_EXT_AVX2_LAYOUT=LAYOUT (int16: the AVX2 int16-pair "
        "layout, where weights of <= 7 bits take the byte layout by default): columns "
        "alt_layout_ms and x_alt_layout (its time / the default's)",
    )
    p.add_argument(
        "--ao-engine",
        default="auto",
        choices=["auto", "x86", "fbgemm", "onednn", "qnnpack"],
        help="torch.ao's quantized engine for the ao_int8 column (auto: x86 and onednn on "
        "x86-64, qnnpack and onednn on Arm, the faster per layer)",
    )
    args = p.parse_args(argv)
    if not 2 <= args.bits <= 8:
        p.error(f"--bits must be in [2, 8], got {args.bits}")
    torch.set_num_threads(args.threads)
    scales = args.scales.split(",")
    kernels = [int(k) for k in args.kernels.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        kernels, batches = [3], [1]

    env = environment()
    backend = dsconv_ext.dsconv2d_backend("cpu")
    print_header("bench_conv", env)
    if backend != "kernel":
        report = dsconv_ext.dsconv_backend_report()["cpu"]
        print(f"# the compiled kernel is NOT in use (DSConv runs the fallback): {report}")
    if args.compare_isa:
        if backend != "kernel":
            p.error("--compare-isa needs the compiled CPU kernel, which is not loaded")
        try:
            got = _on_isa(args.compare_isa, torch.ops.dsconv_ext.cpu_isa)()
        except RuntimeError as e:  # amx on a machine without it, or an unknown name
            p.error(f"--compare-isa {args.compare_isa}: {str(e).splitlines()[0]}")
        print(f"# alt_isa = DSConv with DSCONV_EXT_CPU_ISA={args.compare_isa} (path {got})")
    if args.compare_layout:
        if backend != "kernel":
            p.error("--compare-layout needs the compiled CPU kernel, which is not loaded")
        print(f"# alt_layout = DSConv with DSCONV_EXT_AVX2_LAYOUT={args.compare_layout}")
    print(f"# DSConv weights: {args.bits}-bit VQK, block 32, 8-bit activation mantissas")
    engines = ao_engines(args.ao_engine)
    if not engines:
        have = ", ".join(torch.backends.quantized.supported_engines)
        print(f"# torch.ao: no rows (engine {args.ao_engine} not in this torch: {have})")
    else:
        which = "engine" if len(engines) == 1 else "engines"
        best = "" if len(engines) == 1 else " (the faster per layer: ao_engine in --json)"
        print(f"# torch.ao: {which} {', '.join(engines)}{best}, per-channel int8 weights, "
              "input already quint8")  # fmt: skip
    onednn_int8 = bool({"x86", "fbgemm", "onednn"} & set(engines))
    if onednn_int8 and "avx2" in env["isa_features"] and not VNNI_FLAGS & set(env["isa_features"]):
        print(
            "# torch.ao: 8 x 8-bit products with vpmaddubsw, whose int16 pair sums saturate "
            "without VNNI unless one side drops a bit (oneDNN halves the weights, torch.ao's "
            "default x86 qconfig keeps activations to 7 bits): --bits 7 is DSConv's exact "
            "equivalent"
        )
    rows = bench_cpu(
        scales, kernels, batches, args.rounds, not args.no_fallback, args.quick, args.compare_isa,
        args.bits, args.compare_layout, args.ao_engine,
    )  # fmt: skip
    print_table(rows, COLUMNS)
    print()
    summ = summary(rows)
    print_table(summ, list(summ[0].keys()) if summ else [])
    print()
    stem = bench_stem(scales, batches, args.rounds) if args.stem else []
    if stem:
        print_table(stem, list(stem[0].keys()))
    cuda_rows = []
    if args.cuda or torch.cuda.is_available():
        if torch.cuda.is_available():
            from bench_conv_cuda import cuda_rows as _cuda_rows

            shapes = [
                s for sc in scales for k in kernels for s in _unique(yolo11_conv_shapes(sc, k))
            ]
            cuda_rows = _cuda_rows(shapes)
        else:
            print("# --cuda: no CUDA device here, no CUDA rows")
    if args.json:
        dump_json(
            args.json,
            {
                "env": env,
                "backend": backend,
                "cpu": rows,
                "summary": summ,
                "stem": stem,
                "cuda": cuda_rows,
            },
        )


if __name__ == "__main__":
    main()
