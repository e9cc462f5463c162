"""BiLevelRoutingAttention backends against the reference (the original gather-everything code).

On the three BRA layers of YOLO11n and YOLO11s with the BiFormer head at 640 px (P3 80x80, P4
40x40, P5 20x20; channels from the YAML: n 256/192/384, s 512/384/768), batch 1 and 8 on CPU (2
threads unless --threads) and 16 on CUDA. Forward (inference, no autograd) and forward+backward
(gradients of the input and every parameter). Backends of a row are timed interleaved and the
median of the rounds is reported; ``x ref`` = reference time / backend time, ``mem x`` =
reference peak / backend peak (CPU: the profiler's allocator accounting, each allocation
counted once; CUDA: peak allocated).

    python benchmarks/bench_bra.py                 # full table (minutes: the reference is slow)
    python benchmarks/bench_bra.py --quick         # n-scale P3, batch 1
    python benchmarks/bench_bra.py --json out.json
    python benchmarks/bench_bra.py --check-shapes  # compare the layer table with ultralytics

On a shared machine, OpenMP threads that spin while waiting at barriers steal the cores from
the threads doing work; ``--omp-passive`` sets ``OMP_WAIT_POLICY=PASSIVE`` (recorded in the
output) which made busy-machine timings far steadier for every backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

if "--omp-passive" in sys.argv:  # must precede the OpenMP runtime's start (torch import)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _timing import (  # noqa: E402
    dump_json,
    environment,
    peak_cpu_memory_mb,
    peak_cuda_memory_mb,
    print_header,
    print_table,
    time_interleaved,
)

from dsconv_ext.bra import BiLevelRoutingAttention  # noqa: E402

# (layer, channels, H, W) of each BiLevelRoutingAttention input at 640x640 (--check-shapes).
LAYERS: Dict[str, List[Tuple[str, int, int, int]]] = {
    "n": [("P3", 256, 80, 80), ("P4", 192, 40, 40), ("P5", 384, 20, 20)],
    "s": [("P3", 512, 80, 80), ("P4", 384, 40, 40), ("P5", 768, 20, 20)],
}
YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "yolo11-BiFormer.yaml")  # fmt: skip


def layers_from_ultralytics(scale: str) -> List[Tuple[str, int, int, int]]:
    """BRA input sizes of yolo11{scale} built from the BiFormer YAML (needs ultralytics)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import yaml
    from ultralytics.nn.tasks import DetectionModel

    import dsconv_ext.yolo as yolo

    yolo.register()

    with open(YAML) as f:
        cfg = yaml.safe_load(f)
    cfg["scale"] = scale
    model = DetectionModel(cfg, verbose=False).eval()
    rows = []
    for mod in model.modules():
        if isinstance(mod, BiLevelRoutingAttention):
            mod.register_forward_hook(
                lambda m, inp, out: rows.append((int(inp[0].shape[1]), *inp[0].shape[2:]))
            )
    with torch.no_grad():
        model(torch.zeros(1, 3, 640, 640))
    return [(f"P{i + 3}", c, int(h), int(w)) for i, (c, h, w) in enumerate(rows)]


def _candidates(m, x, backends, train: bool):
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device)
    xs = x.detach().clone().requires_grad_(train)

    def make(backend):
        def fwd():
            m.backend = backend
            with torch.no_grad():
                return m(x)

        def fwd_bwd():
            m.backend = backend
            m.zero_grad(set_to_none=True)
            xs.grad = None
            (m(xs) * gy).sum().backward()

        return fwd_bwd if train else fwd

    return {b: make(b) for b in backends}


def bench_row(scale, layer, c, h, w, batch, train, backends, device, args) -> List[dict]:
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(c).to(device).train(train)
    x = torch.randn(batch, c, h, w, device=device)
    fns = _candidates(m, x, backends, train)
    sync = device if device.startswith("cuda") else None
    # One untimed call each, which also sizes the number of rounds to the slowest candidate.
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    slowest = time.perf_counter() - t0
    rounds = max(args.min_rounds, min(args.rounds, int(args.seconds / max(slowest, 1e-3))))
    ms = time_interleaved(fns, rounds=rounds, warmup=1, device=sync)
    peak = {}
    if not args.no_memory:
        for name, fn in fns.items():
            peak[name] = peak_cuda_memory_mb(fn) if sync else peak_cpu_memory_mb(fn)
    rows = []
    for name in backends:
        row = {
            "scale": scale, "layer": layer, "C": c, "HxW": f"{h}x{w}", "batch": batch,
            "pass": "fwd+bwd" if train else "fwd", "backend": name, "ms": ms[name],
            "x ref": ms["reference"] / ms[name], "rounds": rounds,
        }  # fmt: skip
        if peak:
            row["peak MB"] = peak[name]
            row["mem x"] = peak["reference"] / max(peak[name], 1e-6)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="n-scale P3 only, batch 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--batch", type=int, nargs="*", help="batch sizes (CPU 1 8, CUDA 16)")
    p.add_argument("--scales", nargs="*", default=["n", "s"])
    p.add_argument("--layers", nargs="*", default=["P3", "P4", "P5"])
    p.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    p.add_argument("--backends", nargs="*", help="default: reference, torch (+ triton on CUDA)")
    p.add_argument("--rounds", type=int, default=15, help="most interleaved rounds per row")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="time budget that sizes rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--json", help="write results to this path ('-' for stdout)")
    p.add_argument("--check-shapes", action="store_true", help="compare LAYERS with ultralytics")
    p.add_argument("--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    args = p.parse_args()

    if args.check_shapes:
        bad = []
        for scale, want in LAYERS.items():
            got = layers_from_ultralytics(scale)
            print(f"yolo11{scale}: {got}")
            bad += [scale] if got != want else []
        print("layer table matches ultralytics" if not bad else f"table differs for {bad}")
        return 1 if bad else 0

    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    backends = args.backends or (
        ["reference", "torch", "triton"] if device.startswith("cuda") else ["reference", "torch"]
    )
    if "reference" not in backends:
        backends = ["reference", *backends]
    batches = args.batch or ([16] if device.startswith("cuda") else [1, 8])
    scales, layers, passes = args.scales, args.layers, args.passes
    if args.quick:
        scales, layers, batches = ["n"], ["P3"], args.batch or [1]
        args.rounds, args.seconds = min(args.rounds, 7), min(args.seconds, 8.0)

    load0 = os.getloadavg()
    rows: List[dict] = []
    for scale in scales:
        for layer, c, h, w in LAYERS[scale]:
            if layer not in layers:
                continue
            for batch in batches:
                for ps in passes:
                    new = bench_row(scale, layer, c, h, w, batch, ps != "fwd", backends, device,
                                    args)  # fmt: skip
                    rows += new
                    print(
                        "  ".join(f"{r['backend']} {r['ms']:.1f} ms (x{r['x ref']:.2f})"
                                  for r in new), f"<- {scale} {layer} b{batch} {ps}",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
    load1 = os.getloadavg()
    env = dict(environment(), device=device, loadavg_before=load0, loadavg_after=load1,
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"))  # fmt: skip
    print()
    print_header("bench_bra", env)
    wait = env["omp_wait_policy"]
    print(f"# device {device}, load average {load0} -> {load1}, OMP_WAIT_POLICY {wait}")
    cols = ["scale", "layer", "C", "HxW", "batch", "pass", "backend", "ms", "x ref"]
    if not args.no_memory:
        cols += ["peak MB", "mem x"]
    print_table(rows, cols)
    if args.json:
        dump_json(args.json, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
