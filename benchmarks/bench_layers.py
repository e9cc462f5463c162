"""Per-layer benchmark: every convolution of a converted YOLO11 against the same layer in
OpenVINO int8, with both put against this CPU's multiply-add peak.

``bench_model.py`` gives one ratio per model; this shows where it comes from. For each model
(the same checkpoint, random weights unless ``--weights-dir``, image and conversions as
``bench_model.py --no-accuracy``):

- ours: the model converted by ``dsconv_ext.quantize`` (as bench_model's ``int8`` row, or with
  ``--ours int7`` / ``int4`` its rows of that weight width: ``int7`` is the fast one on AVX2
  CPUs without VNNI), its eager forward with a wall-clock timer around each convolution layer's
  call (the DSConv layers, the float stem, any layer kept float; see ``time_ours`` for why not
  the PyTorch profiler), median of ``--rounds`` forwards in each of ``--cycles`` processes.
- OpenVINO int8 (``--peer openvino-int8``, the default: NNCF, MIXED preset, the Detect head's
  postprocessing left in float, as ``bench_model``'s ``openvino-int8`` row), or OpenVINO at its
  default precision (``--peer openvino``: bf16 where the CPU has it, the fastest peer on AMX
  CPUs; needs no NNCF): the model inferred with ``PERF_COUNT`` on, the median of each node's own
  time, alike. OpenVINO fuses the activation and the requantisation of the output into the
  convolution node, and its input is already int8 in its blocked layout.

Each side runs in processes of its own, alternated (ours, OpenVINO, ours, ...) so that a slow
stretch of the host falls on both.

Both are times inside the model's forward, each layer after the one that produced its input
(what is still in cache, as deployed).

Per layer: multiply-accumulates, both times, ``speed vs OpenVINO`` (OpenVINO's time / ours, as
bench_model's ``dsconv_ext int8 vs this``), GMAC/s, and the share of the int8 multiply-add peak
of ``--threads`` cores: one core's ``vpdpbusd`` rate, measured as ``bench_isa.py`` does (zmm on
AVX-512 VNNI, ymm on AVX-VNNI), or on AVX2 CPUs without VNNI its ``vpmaddwd`` rate (16 exact
int8 products per instruction, the accumulating ``vpaddd`` not counted: what both our AVX2
kernel and OpenVINO's ``vpmaddubsw`` path are bound by); no column on other CPUs. A layer near
100% is bound by its multiply-adds; the gap between ours and OpenVINO's on such a layer is what
our packing of the float32 input, the float epilogue and the thread fork cost beyond its integer
dot products.
Then totals per layer kind, and what OpenVINO spends outside its convolutions.

Reading it: our layer times include the layer's own Python call (30-40 us on an AMX Xeon,
small against the large layers, not against the smallest), OpenVINO's counters add a little to
each node; OpenVINO reports some fused nodes' time on a neighbour: a node above the peak is
flagged, not believed.

    python benchmarks/bench_layers.py                       # yolo11n and yolo11s, 640 px
    python benchmarks/bench_layers.py --models yolo11n --threads 2 --json layers.json
    python benchmarks/bench_layers.py --manifest ~/.cache/dsconv_ext_bench_model/artifacts/*.json

``--manifest`` reuses the artifacts a ``bench_model.py`` run prepared (it must hold the ``--ours``
and the ``--peer`` files); otherwise they are made here (about a minute per model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runtimes  # noqa: E402
import bench_model  # noqa: E402  (its preparation step and worker environment)
from _timing import (  # noqa: E402
    _cpu_model_and_flags,
    dump_json,
    environment,
    print_header,
    print_table,
    warm_allocator,
)

SCRIPT = os.path.abspath(__file__)
PEERS = ("openvino-int8", "openvino")
OURS = ("int8", "int7", "int4")
# OpenVINO names a node after the module that traced it: "__module.model.3.conv/aten::_convolution
# /Convolution" for ultralytics' model.3.conv.
_OV_CONV = re.compile(r"^__module\.(?P<module>[^/]+)/aten::_convolution/")
KINDS = ("3x3 stride 1", "3x3 stride 2", "1x1", "depthwise", "other")


def layer_key(module_name: str) -> str:
    """The name both sides share: ultralytics' ``Conv`` wraps its ``nn.Conv2d`` as ``.conv``,
    which our stem module replaces whole (``model.0``) and OpenVINO names with the suffix
    (``model.0.conv``)."""
    return module_name[: -len(".conv")] if module_name.endswith(".conv") else module_name


def openvino_conv_layer(node_name: str, node_type: str) -> Optional[str]:
    """The layer key of an OpenVINO convolution node, None for any other node."""
    if node_type not in ("Convolution", "GroupConvolution"):
        return None
    m = _OV_CONV.match(node_name)
    return layer_key(m.group("module")) if m else None


def layer_kind(k: int, stride: int, groups: int, cin: int) -> str:
    if groups > 1 and groups == cin:
        return "depthwise"
    if groups == 1 and k == 3:
        return f"3x3 stride {stride}" if stride in (1, 2) else "other"
    if groups == 1 and k == 1 and stride == 1:
        return "1x1"
    return "other"


def conv_macs(out_shape, cin: int, groups: int, kh: int, kw: int) -> int:
    n, cout, ho, wo = out_shape
    return n * cout * ho * wo * (cin // groups) * kh * kw


# ---------------------------------------------------------------- our side
def our_layers(model) -> Dict[str, object]:
    """name -> module of every convolution the converted model runs: DSConv2d layers, the
    float stem (FastStemConv, which replaces its whole Conv), float nn.Conv2d layers (kept by the
    speed check, or the DFL's fixed conv: FastDFL has none)."""
    from dsconv_ext.dsconv.module import DSConv2d
    from dsconv_ext.yolo.fast_stem import FastStemConv

    layers, inside_stem = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, FastStemConv):
            layers[name] = m
            inside_stem.update(f"{name}.{sub}" for sub, _ in m.named_modules() if sub)
        elif isinstance(m, (DSConv2d, torch.nn.Conv2d)) and name not in inside_stem:
            layers[name] = m
    return layers


def _conv_of(m):
    """The nn.Conv2d-like module holding the geometry (the stem wraps one as ``.conv``)."""
    return m.conv if hasattr(m, "conv") and isinstance(m.conv, torch.nn.Module) else m


def _install_timers(layers: Dict[str, object], samples: Dict[str, List[float]]):
    """Wraps each layer's ``forward`` (and a DSConv2d's ``forward_into``, which in-place
    concatenations call instead) in a wall-clock timer, on the instance: no forward hook, which
    would send ``forward_into`` down its copying path. A call made inside a timed one (a layer's
    fallback through its own forward) is not timed twice. Returns a function undoing it."""
    busy = [False]

    def timed(name, fn):
        def call(*args, **kwargs):
            if busy[0]:
                return fn(*args, **kwargs)
            busy[0] = True
            try:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                samples[name].append((time.perf_counter() - t0) * 1e6)
                return out
            finally:
                busy[0] = False

        return call

    wrapped = []
    for name, m in layers.items():
        for attr in ("forward", "forward_into"):
            fn = getattr(m, attr, None)
            if fn is not None:
                # (ultralytics' fuse() sets an instance's own forward: put that one back)
                wrapped.append((m, attr, vars(m).get(attr)))
                setattr(m, attr, timed(name, fn))

    def undo():
        for m, attr, own in wrapped:
            if own is None:
                delattr(m, attr)
            else:
                setattr(m, attr, own)

    return undo


def time_ours(man: Dict, variant: str, threads: int, rounds: int, warmup: int) -> Dict[str, object]:
    """Each convolution's time inside the converted model's eager forward, one sample per
    forward: a wall-clock timer around each layer's call, so the op and the layer's own Python
    (30-40 us per layer on an AMX Xeon, which the recorded-graph forward mostly skips).

    Not the PyTorch profiler: a profiling session makes the forward page-fault (here ~1,000
    minor faults per yolo11n forward with it, none without), and its cost lands on the layers
    that write large outputs into fresh memory (on an AMX Xeon, model.2.cv2 took 2.0 ms under
    the profiler against 0.74 ms without it)."""
    os.environ["DSCONV_EXT_CAPTURE"] = "0"
    from ultralytics import YOLO

    import dsconv_ext  # noqa: F401  (registers the converted modules with ultralytics)

    torch.set_num_threads(threads)
    model = YOLO(man["files"][variant]).model.float().eval()
    x = torch.from_numpy(np.load(man["input"]))
    layers = our_layers(model)
    order: List[str] = []
    rows: Dict[str, Dict[str, object]] = {}

    def record(name, m, inp, out):
        order.append(name)
        c = _conv_of(m)
        kh, kw = c.kernel_size
        rows[name] = {
            "layer": layer_key(name),
            "module": type(m).__name__,
            "bits": getattr(c, "bits", None),  # the DSConv weight width (None: a float conv)
            "in": c.in_channels,
            "out": c.out_channels,
            "k": kh,
            "stride": c.stride[0],
            "groups": c.groups,
            "input hw": list(inp[0].shape[2:]),
            "kind": layer_kind(kh, c.stride[0], c.groups, c.in_channels),
            "MACs": conv_macs(tuple(out.shape), c.in_channels, c.groups, kh, kw),
        }

    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o))
        for name, m in layers.items()
    ]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    samples: Dict[str, List[float]] = {name: [] for name in order}
    forwards, plain = [], []
    with torch.inference_mode():
        warm_allocator()
        for _ in range(warmup):
            model(x)
        for _ in range(rounds):
            # A timed forward, then one without the timers, for the total.
            undo = _install_timers(layers, samples)
            t0 = time.perf_counter()
            model(x)
            forwards.append((time.perf_counter() - t0) * 1e3)
            undo()
            t0 = time.perf_counter()
            model(x)
            plain.append((time.perf_counter() - t0) * 1e3)
    for name in order:
        if len(samples[name]) != rounds:
            raise RuntimeError(f"{name} ran {len(samples[name])} times in {rounds} forwards")
        rows[name]["samples us"] = samples[name]
    return {
        "layers": [rows[name] for name in order],
        "forward ms (timers on)": forwards,
        "forward ms": plain,
    }


# ---------------------------------------------------------------- OpenVINO's side
def time_openvino(
    man: Dict, peer: str, threads: int, rounds: int, warmup: int
) -> Dict[str, object]:
    import openvino as ov

    compiled = ov.Core().compile_model(
        man["files"][peer],
        "CPU",
        {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True},
    )
    req = compiled.create_infer_request()
    feed = {0: np.load(man["input"])}
    for _ in range(warmup):
        req.infer(feed, share_inputs=True, share_outputs=True)
    nodes: Dict[str, Dict[str, object]] = {}
    walls = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        req.infer(feed, share_inputs=True, share_outputs=True)
        walls.append((time.perf_counter() - t0) * 1e3)
        for p in req.profiling_info:
            if p.status != p.Status.EXECUTED:  # fused into another node, or optimised out
                continue
            node = nodes.setdefault(
                p.node_name, {"type": p.node_type, "exec": p.exec_type, "samples": []}
            )
            node["samples"].append(p.real_time.total_seconds() * 1e6)
    # A node that ran in only some rounds: merge_cycles counts 0 for the others.
    out = {name: {**node, "samples us": node.pop("samples")} for name, node in nodes.items()}
    return {"nodes": out, "inference ms (counters on)": walls}


# ---------------------------------------------------------------- the parent
def int8_peak_macs_per_ns() -> Optional[Dict[str, object]]:
    """One core's int8 multiply-add peak as bench_isa.py measures it: the vpdpbusd rate in its
    widest form this CPU has, else (AVX2 without VNNI) the vpmaddwd rate."""
    import bench_isa

    _, flags = _cpu_model_and_flags()
    names = [
        n
        for n in ("vpdpbusd zmm", "vpdpbusd ymm (AVX-VNNI)", "vpmaddwd ymm")
        if bench_isa.KERNELS[n][0] <= flags
    ]
    if not names or shutil.which("cc") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        _, macs_per_ns = bench_isa.measure(names[0], 20_000_000, 5, tmp)
    return {"instruction": names[0], "MACs per ns per core": round(macs_per_ns, 1)}


def join(ours: List[Dict], ov_nodes: Dict[str, Dict], peak_gmacs: Optional[float]):
    """Our layers and OpenVINO's convolution nodes, matched by layer; OpenVINO's other nodes."""
    ov_convs: Dict[str, Dict] = {}
    outside = 0.0
    for name, node in ov_nodes.items():
        key = openvino_conv_layer(name, node["type"])
        if key is None:
            outside += node["us"]
        else:
            ov_convs[key] = {"node": name, **node}
    rows, only_ours = [], []
    for row in ours:
        ov = ov_convs.pop(row["layer"], None)
        if ov is None:
            only_ours.append(row["layer"])
            continue
        r = dict(row)
        r["OpenVINO us"] = ov["us"]
        r["OpenVINO kernel"] = ov["exec"]
        r["speed vs OpenVINO"] = ov["us"] / row["us"]
        r["GMAC/s"] = row["MACs"] / row["us"] / 1e3
        r["OpenVINO GMAC/s"] = row["MACs"] / ov["us"] / 1e3 if ov["us"] > 0 else None
        if peak_gmacs:
            r["% peak"] = 100 * r["GMAC/s"] / peak_gmacs
            if r["OpenVINO GMAC/s"] is not None:
                r["OpenVINO % peak"] = 100 * r["OpenVINO GMAC/s"] / peak_gmacs
                if "I8" in ov["exec"] and r["OpenVINO % peak"] > 100:
                    r["note"] = "OpenVINO above the peak: part of its time is on another node"
        rows.append(r)
    return rows, only_ours, sorted(ov_convs), outside


def by_kind(rows: List[Dict], peak_gmacs: Optional[float]) -> List[Dict]:
    out = []
    for kind in (*KINDS, "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        if not sel:
            continue
        macs = sum(r["MACs"] for r in sel)
        ours = sum(r["us"] for r in sel)
        ov = sum(r["OpenVINO us"] for r in sel)
        row = {
            "kind": kind,
            "layers": len(sel),
            "GMAC": macs / 1e9,
            "ours ms": ours / 1e3,
            "OpenVINO ms": ov / 1e3,
            "speed vs OpenVINO": ov / ours,
            "GMAC/s": macs / ours / 1e3,
            "OpenVINO GMAC/s": macs / ov / 1e3,
        }
        if peak_gmacs:
            row["% peak"] = 100 * row["GMAC/s"] / peak_gmacs
            row["OpenVINO % peak"] = 100 * row["OpenVINO GMAC/s"] / peak_gmacs
        out.append(row)
    return out


def merge_cycles(ours_runs: List[Dict], ov_runs: List[Dict]):
    """One result per side from its processes: per layer / node, the median of all rounds."""
    layers = []
    for i, row in enumerate(ours_runs[0]["layers"]):
        samples = [s for run in ours_runs for s in run["layers"][i]["samples us"]]
        layers.append({**{k: v for k, v in row.items() if k != "samples us"},
                       "us": statistics.median(samples)})  # fmt: skip
    ours = {
        "layers": layers,
        **{
            key: statistics.median([v for run in ours_runs for v in run[key]])
            for key in ("forward ms", "forward ms (timers on)")
        },
    }
    nodes: Dict[str, Dict] = {}
    for run in ov_runs:
        for name, node in run["nodes"].items():
            entry = nodes.setdefault(name, {"type": node["type"], "exec": node["exec"], "s": []})
            entry["s"].extend(node["samples us"])
    rounds = sum(len(run["inference ms (counters on)"]) for run in ov_runs)
    ov = {
        # A node absent from some rounds (fused differently in a process) took 0 there.
        "nodes": {
            name: {
                "type": e["type"],
                "exec": e["exec"],
                "us": statistics.median(e["s"] + [0.0] * (rounds - len(e["s"]))),
            }
            for name, e in nodes.items()
        },  # fmt: skip
        "inference ms (counters on)": statistics.median(
            [v for run in ov_runs for v in run["inference ms (counters on)"]]
        ),
    }
    return ours, ov


def prepare(name: str, args, env: Dict[str, str]) -> Dict:
    """bench_model.py's preparation of ``name``: random weights (or ``--weights-dir``), the
    converted checkpoint and the peer's model, in a process of its own."""
    prep = argparse.Namespace(
        work=args.work, imgsz=args.imgsz, threads=args.threads, calib_images=args.calib_images,
        seed=args.seed, variants=[args.ours, args.peer], depthwise=True,
        prepare_timeout=args.timeout, weights_dir=args.weights_dir, accuracy=False,
    )  # fmt: skip
    return bench_model.prepare_model(name, prep, None, env)


def run_side(side: str, man: Dict, args, env: Dict[str, str], tmp: str) -> Dict:
    out = os.path.join(tmp, f"{side}.json")
    cmd = [sys.executable, SCRIPT, "--worker", side, "--manifest", man["manifest"],
           "--ours", args.ours, "--threads", str(args.threads), "--rounds", str(args.rounds),
           "--warmup", str(args.warmup), "--json-out", out]  # fmt: skip
    rc, tail = _runtimes.run_subprocess(cmd, env, args.timeout)
    if rc != 0:
        raise RuntimeError(f"the {side} worker failed (rc {rc}):\n{tail}")
    with open(out) as f:
        return json.load(f)


LAYER_COLUMNS = ["layer", "kind", "in", "out", "input hw", "MACs", "us", "OpenVINO us",
                 "speed vs OpenVINO", "% peak", "OpenVINO % peak", "OpenVINO kernel",
                 "note"]  # fmt: skip
KIND_COLUMNS = ["kind", "layers", "GMAC", "ours ms", "OpenVINO ms", "speed vs OpenVINO",
                "GMAC/s", "OpenVINO GMAC/s", "% peak", "OpenVINO % peak"]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["yolo11n", "yolo11s"])
    p.add_argument(
        "--peer", choices=PEERS, default="openvino-int8", help="what each layer is put against"
    )
    p.add_argument(
        "--ours", choices=OURS, default="int8", help="which converted model (weight width) to time"
    )
    p.add_argument("--manifest", nargs="+", help="reuse bench_model.py artifacts (one per model)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "dsconv_ext_bench_layers"))
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (every layer once each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cycles", type=int, default=2, help="processes per side, alternated")
    p.add_argument("--calib-images", type=int, default=16, help="int8 calibration images")
    p.add_argument("--seed", type=int, default=0, help="random weights and images")
    p.add_argument("--weights-dir", help="directory with yolo11n.pt / yolo11s.pt (else random)")
    p.add_argument("--timeout", type=float, default=1800, help="s per child process")
    p.add_argument("--top", type=int, default=0, help="print only the N layers furthest behind")
    p.add_argument("--json", help="write the results here ('-' for stdout)")
    for flag in ("--worker", "--json-out"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        with open(args.manifest[0]) as f:
            man = json.load(f)
        if args.worker == "ours":
            got = time_ours(man, args.ours, args.threads, args.rounds, args.warmup)
        else:
            got = time_openvino(man, args.worker, args.threads, args.rounds, args.warmup)
        dump_json(args.json_out, got)
        return 0

    missing = _runtimes.missing(args.peer)
    if missing:
        print(f"bench_layers: --peer {args.peer} needs {missing}; pip install .[bench]")
        return 1
    torch.set_num_threads(args.threads)
    env = environment()
    print_header("bench_layers", env)
    peak = int8_peak_macs_per_ns()
    peak_gmacs = peak["MACs per ns per core"] * args.threads if peak else None
    if peak:
        print(f"# int8 peak: {peak['instruction']} at {peak['MACs per ns per core']} MAC/ns per "
              f"core, x {args.threads} threads = {peak_gmacs:.0f} GMAC/s")  # fmt: skip
    else:
        print("# int8 peak: not measured (no AVX2, or no C compiler)")
    print(f"# per layer, inside the forward: our {args.ours} layer times (wall-clock timers) and "
          f"{_runtimes.RUNTIMES[args.peer].label}'s node times (PERF_COUNT), medians of "
          f"{args.rounds} forwards x {args.cycles} alternated processes per side")  # fmt: skip
    child_env = bench_model._worker_env(args)
    results = {"environment": env, "peak": peak, "args": vars(args), "models": {}}
    if args.manifest:
        mans = []
        for path in args.manifest:
            with open(path) as f:
                man = json.load(f)
            man["manifest"] = path
            absent = [k for k in (args.ours, args.peer) if k not in man["files"]]
            if absent:
                print(f"bench_layers: {path} has no {', '.join(absent)} artifact")
                return 1
            mans.append(man)
    else:
        mans = [prepare(name, args, child_env) for name in args.models]
    with tempfile.TemporaryDirectory() as tmp:
        for man in mans:
            name = f"{man['model']} {man['imgsz']} px"
            # Processes alternate (ours, OpenVINO, ours, ...): a slow stretch of the host then
            # falls on both sides; each layer's median is over all cycles' rounds.
            runs = [
                (
                    run_side("ours", man, args, child_env, tmp),
                    run_side(args.peer, man, args, child_env, tmp),
                )
                for _ in range(args.cycles)
            ]
            ours, ov = merge_cycles([r[0] for r in runs], [r[1] for r in runs])
            rows, only_ours, only_ov, outside = join(ours["layers"], ov["nodes"], peak_gmacs)
            kinds = by_kind(rows, peak_gmacs)
            results["models"][name] = {
                "layers": rows,
                "by kind": kinds,
                "only ours": only_ours,
                "only OpenVINO": only_ov,
                "OpenVINO outside convolutions ms": outside / 1e3,
                "ours forward ms (timers on)": ours["forward ms (timers on)"],
                "ours forward ms": ours["forward ms"],
                "OpenVINO inference ms (counters on)": ov["inference ms (counters on)"],
            }
            print(f"\n## {name}: by layer kind")
            print_table(kinds, [c for c in KIND_COLUMNS if peak or "peak" not in c])
            conv_ms = sum(r["us"] for r in ours["layers"]) / 1e3
            fwd = ours["forward ms"]
            ov_conv_ms = sum(r["OpenVINO us"] for r in rows) / 1e3
            print(f"# convolutions: ours {conv_ms:.2f} ms of a {fwd:.2f} ms forward ("
                  f"{ours['forward ms (timers on)']:.2f} ms with the timers); OpenVINO "
                  f"{ov_conv_ms:.2f} ms + "
                  f"{outside / 1e3:.2f} ms outside them of a "
                  f"{ov['inference ms (counters on)']:.2f} ms inference (counters on)")  # fmt: skip
            if only_ours or only_ov:
                print(f"# unmatched: ours {only_ours or '-'}; OpenVINO {only_ov or '-'}")
            shown = rows
            if args.top:
                shown = sorted(rows, key=lambda r: r["OpenVINO us"] - r["us"])[: args.top]
            which = f" (the {args.top} furthest behind)" if args.top else ""
            print(f"\n## {name}: per layer{which}")
            print_table(shown, [c for c in LAYER_COLUMNS if peak or "peak" not in c])
    if args.json:
        dump_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
