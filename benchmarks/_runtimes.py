"""The runtimes ``bench_model.py`` times, each in a process of its own.

A CPU user who wants a faster YOLO11 than eager PyTorch has other choices than ``dsconv_ext``:
OpenVINO (its default precision, or int8 through NNCF), onnxruntime (fp32, or int8 static QDQ)
and ``torch.compile``. Their thread pools spin after each call, so timed in one process, one
after the other or interleaved, they steal each other's cores: every runtime, ours included, is
timed in a fresh process (``python bench_model.py --worker KEY ...``) that loads one model,
warms it up and times many calls on the same input with the same thread count, and the processes
are cycled (A B C ... A B C ...) so that a slow phase of the host hits each alike.

This module holds, per runtime: the packages it needs (a missing one skips its row with the
reason), how its artifact is made from the float checkpoint (``prepare``: ONNX / OpenVINO
exports, int8 calibration, DSConv conversion), how a worker loads and calls it (``load``), and the
parent's side (``run_worker``, ``summarize``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Runtime:
    key: str  # --variants / --worker name
    label: str  # the table's row
    peer: bool  # something a CPU user would pick instead of dsconv_ext
    packages: Tuple[str, ...]  # importable modules it needs beyond torch and ultralytics


# dsconv_ext's own rows: the converted model at these VQK widths (7 bits: the weight precision
# oneDNN and onnxruntime's reduce_range compute with on CPUs without VNNI).
OURS_BITS = (8, 7, 4)
OURS = tuple(f"int{b}" for b in OURS_BITS)

RUNTIMES = {
    r.key: r
    for r in (
        Runtime("float", "float eager", False, ()),
        Runtime("stand-ins", "float+stand-ins", False, ()),
        Runtime("int8", "dsconv_ext int8", False, ()),
        Runtime("int7", "dsconv_ext int7", False, ()),
        Runtime("int4", "dsconv_ext int4", False, ()),
        Runtime("compile", "torch.compile float", True, ()),
        Runtime("openvino", "openvino f32 (default precision)", True, ("openvino",)),
        Runtime("openvino-int8", "openvino int8 (NNCF MIXED)", True, ("openvino", "nncf")),
        Runtime("onnxruntime", "onnxruntime fp32", True, ("onnxruntime", "onnx")),
        Runtime(
            "onnxruntime-int8",
            "onnxruntime int8 static QDQ per-channel",
            True,
            ("onnxruntime", "onnx"),
        ),
    )
}
BENCH_EXTRA = "pip install .[bench]"


def missing(key: str) -> Optional[str]:
    """Why a runtime cannot run here (a package is not installed), or None."""
    absent = [p for p in RUNTIMES[key].packages if importlib.util.find_spec(p) is None]
    if absent:
        return f"{', '.join(absent)} not installed ({BENCH_EXTRA})"
    return None


def versions() -> Dict[str, str]:
    """Versions of the peers' packages, for the header ('-' where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("openvino", "nncf", "onnxruntime", "onnx", "onnxslim"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


# ---------------------------------------------------------------- artifacts (prepare step)
def random_checkpoint(name: str, path: Path, images: np.ndarray, seed: int) -> None:
    """Write an ultralytics checkpoint of ``name`` (its stock 80-class head) with random weights.

    Latency needs no training, but PyTorch's default init shrinks activations ~3x per layer
    (1e-10 by the neck of yolo11n), nothing like a trained model, and a kernel's speed may depend
    on the scale of its inputs (our int8 fold takes another path for subnormal products). So the
    BatchNorm statistics are set from one forward pass over ``images`` (each layer's output then
    has unit variance, as after training): statistics only, no gradient, no optimiser step."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(seed)
    yolo = YOLO(f"{name}.yaml")
    model = yolo.model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    yolo.save(str(path))


def openvino_head_scope(model) -> List[str]:
    """Names of the ops ``yolo export format=openvino int8=True`` leaves in float: the Detect
    head's postprocessing (ops directly in the head module and in its DFL: concatenations, box
    decode, softmax) and every Sigmoid; the head's convolutions are quantised. Same rule as
    ultralytics' ``torch2openvino`` (8.4), applied to the IR it exports."""
    ops = model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"]
    if not sigmoids:
        raise ValueError("no Sigmoid in the OpenVINO model: not a YOLO Detect head")
    head = sigmoids[-1].split("/", 1)[0]  # "__module.model.23"
    return [
        op.get_friendly_name()
        for op in ops
        if op.get_type_name() == "Sigmoid"
        or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))
    ]


def onnx_head_nodes(graph) -> List[str]:
    """The ONNX counterpart of :func:`openvino_head_scope`. torch.onnx names a node by its module
    path ("/model.23/cv2.0/cv2.0.0/conv/Conv"), so the head module's own ops (its Sigmoid
    included) are those with no further path component below "/model.23/", and the DFL's are
    under "/model.23/dfl/". Unlike the OpenVINO rule, not every Sigmoid: the ONNX export spells
    each SiLU as Sigmoid * x (OpenVINO's IR has a Swish op there, which ultralytics' rule leaves
    to NNCF)."""
    sigmoids = [n.name for n in graph.node if n.op_type == "Sigmoid"]
    if not sigmoids:
        raise ValueError("no Sigmoid in the ONNX graph: not a YOLO Detect head")
    head = sigmoids[-1].rsplit("/", 1)[0] + "/"  # the last one is the head's: "/model.23/"
    out = []
    for n in graph.node:
        if n.name.startswith(head):
            rest = n.name[len(head) :]
            if "/" not in rest or rest.startswith("dfl/"):
                out.append(n.name)
    return out


def _op_counts(types: List[str]) -> str:
    counts: Dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{t} x{c}" if c > 1 else t for t, c in sorted(counts.items()))


def _export(pt: Path, fmt: str, imgsz: int) -> str:
    from ultralytics import YOLO

    kwargs = {}
    if fmt == "onnx":  # ultralytics' default for a user who has onnxslim; no auto-install offline
        kwargs["simplify"] = importlib.util.find_spec("onnxslim") is not None
    return str(YOLO(str(pt)).export(format=fmt, imgsz=imgsz, verbose=False, **kwargs))


def _quantize_openvino(xml: str, out: Path, calib: np.ndarray) -> Dict[str, object]:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(xml)
    names = openvino_head_scope(model)
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    quantized = nncf.quantize(
        model,
        nncf.Dataset([im[None] for im in calib]),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calib),  # all of them, as ultralytics does
        ignored_scope=nncf.IgnoredScope(names=names),
    )
    out.mkdir(parents=True, exist_ok=True)
    dst = out / Path(xml).name
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    left = [types[n] for n in names if types[n] not in ("Constant", "Convert")]
    return {
        "file": str(dst),
        "calibration images": len(calib),
        "FakeQuantize ops": fq,
        "left in float": _op_counts(left),
    }


def _quantize_onnx(src: str, dst: Path, calib: np.ndarray) -> Dict[str, object]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # onnxruntime's recommended preprocessing (shape inference, graph optimisation) first.
    pre = dst.with_name(dst.stem + "-pre.onnx")
    quant_pre_process(src, str(pre))
    graph = onnx.load(str(pre)).graph
    exclude = onnx_head_nodes(graph)
    types = {n.name: n.op_type for n in graph.node}
    input_name = graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{input_name: im[None]} for im in calib])

        def get_next(self):
            return next(self._it, None)

    quantize_static(
        str(pre),
        str(dst),
        Images(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # onnxruntime's documented choice for x86 CPUs with VNNI: u8 activations, s8 weights,
        # full 8-bit range.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=False,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude,
    )
    pre.unlink()
    n_q = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(dst)).graph.node)
    return {
        "file": str(dst),
        "calibration images": len(calib),
        "QuantizeLinear nodes": n_q,
        "left in float": _op_counts([types[n] for n in exclude]),
        "excluded nodes": exclude,
    }


def prepare(
    out: Path,
    name: str,
    keys: List[str],
    weights: Optional[str],
    x: np.ndarray,
    calib: np.ndarray,
    seed: int,
    depthwise: bool,
    log: Callable[[str], None],
) -> Dict[str, object]:
    """Make every artifact ``keys`` need in ``out`` and return the manifest the workers read.

    ``x``: the timed input, [1, 3, H, W]; ``calib``: the int8 calibration images, which with
    ``weights`` None also give the random model its BatchNorm statistics. A step that fails
    skips its rows with the reason instead of stopping the benchmark."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    imgsz = x.shape[-1]
    pt = out / f"{name}.pt"
    if weights:
        shutil.copyfile(weights, pt)
        source = weights
    else:
        random_checkpoint(name, pt, calib, seed)
        source = f"random init (seed {seed}, stock 80-class head, BatchNorm statistics set)"
    np.save(out / "input.npy", x)
    man: Dict[str, object] = {
        "model": name,
        "imgsz": imgsz,
        "weights": source,
        "input": str(out / "input.npy"),
        "files": {"float": str(pt), "stand-ins": str(pt), "compile": str(pt)},
        "info": {},
        "skipped": {},
    }
    files, info, skipped = man["files"], man["info"], man["skipped"]

    def step(key: str, fn: Callable[[], Dict[str, object]]) -> None:
        why = missing(key)
        if why:
            skipped[key] = why
            return
        log(f"# {name}: preparing {RUNTIMES[key].label}")
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as e:  # report and go on: one runtime's failure is one row
            skipped[key] = f"preparation failed: {type(e).__name__}: {str(e)[:300]}"
            return
        files[key] = got.pop("file")
        info[key] = {**got, "prepare s": round(time.perf_counter() - t0, 1)}

    for bits in OURS_BITS:
        if f"int{bits}" in keys:

            def convert(bits=bits):
                from dsconv_ext.yolo.convert import convert_checkpoint

                dst = out / f"{name}-ds{bits}.pt"
                convert_checkpoint(str(pt), str(dst), bits=bits, depthwise=depthwise)
                return {"file": str(dst)}

            step(f"int{bits}", convert)
    if {"onnxruntime", "onnxruntime-int8"} & set(keys):
        step("onnxruntime", lambda: {"file": _export(pt, "onnx", imgsz)})
        if "onnxruntime-int8" in keys:
            if "onnxruntime" in files:
                step(
                    "onnxruntime-int8",
                    lambda: _quantize_onnx(
                        files["onnxruntime"], out / f"{name}-int8-qdq.onnx", calib
                    ),
                )
            else:
                skipped["onnxruntime-int8"] = skipped["onnxruntime"]
    if {"openvino", "openvino-int8"} & set(keys):
        step("openvino", lambda: {"file": str(Path(_export(pt, "openvino", imgsz), f"{name}.xml"))})
        if "openvino-int8" in keys:
            if "openvino" in files:
                step(
                    "openvino-int8",
                    lambda: _quantize_openvino(files["openvino"], out / "openvino_int8", calib),
                )
            else:
                skipped["openvino-int8"] = skipped["openvino"]
    for key in keys:
        if key in files or key in skipped:
            continue
        skipped[key] = "nothing prepared"
    for key in list(files):
        if key not in keys and key != "float":
            del files[key]
    return man


def file_mib(path: str) -> float:
    """Size on disk of a model: a checkpoint, an ONNX file, or an OpenVINO IR (.xml + .bin)."""
    p = Path(path)
    size = p.stat().st_size
    if p.suffix == ".xml" and p.with_suffix(".bin").exists():
        size += p.with_suffix(".bin").stat().st_size
    return size / 2**20


# ---------------------------------------------------------------- worker side
def load(
    key: str, man: Dict[str, object], threads: int, x: np.ndarray
) -> Tuple[Callable[[], object], Callable[[], np.ndarray], Dict[str, object]]:
    """Load one runtime: returns (one inference call, the model's first output as numpy after a
    call, facts about the run: precision, threads as the runtime reports them)."""
    import torch

    path = man["files"][key]
    if key in ("openvino", "openvino-int8"):
        import openvino as ov

        compiled = ov.Core().compile_model(
            path, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        )
        req = compiled.create_infer_request()
        feed = {0: x}
        # What it runs the float parts in: bf16 by default where the CPU has it (AMX, or
        # avx512_bf16 as on Zen 4/5), else f32.
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        info = {
            "precision": ("int8 + " + precision + " rest") if key.endswith("int8") else precision,
            "INFERENCE_PRECISION_HINT": precision,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(compiled.get_property("NUM_STREAMS")),
        }

        # share_inputs / share_outputs: no copy of the input or output per call (torch and
        # onnxruntime do not copy either).
        def call():
            return req.infer(feed, share_inputs=True, share_outputs=True)

        return call, lambda: np.array(req.get_output_tensor(0).data), info

    if key in ("onnxruntime", "onnxruntime-int8"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        last = {}

        def call():
            last["out"] = sess.run(None, feed)
            return last["out"]

        info = {
            "precision": "u8 act / s8 weight QDQ" if key.endswith("int8") else "fp32",
            "threads": threads,
        }
        return call, lambda: np.asarray(last["out"][0]), info

    from ultralytics import YOLO

    import dsconv_ext  # noqa: F401  (registers the converted modules with ultralytics)

    xt = torch.from_numpy(x)
    info: Dict[str, object] = {}
    if key in OURS:
        model = YOLO(path).model.float().eval()
        record = getattr(model, "dsconv_ext", {})
        kept = len(record.get("kept_float", {}))
        info["precision"] = f"DSConv w{key[3:]}a8, float head/stem" + (
            f"; {kept} of {kept + len(record.get('converted', []))} convs kept float by the "
            "speed check"
            if kept
            else ""
        )
    else:
        model = YOLO(path).model.float().fuse(verbose=False).eval()
        info["precision"] = "fp32"
        if key == "stand-ins":
            from dsconv_ext.yolo.convert import replace_pooling
            from dsconv_ext.yolo.fast_dfl import use_fast_dfl
            from dsconv_ext.yolo.fast_stem import use_fast_stem

            replace_pooling(model)
            use_fast_dfl(model)
            use_fast_stem(model)
        elif key == "compile":
            # The default: inductor backend, default mode (a user's first try).
            model = torch.compile(model)
    # ultralytics' select_device() sets torch's thread count when it loads a model: set ours after.
    torch.set_num_threads(threads)
    info["threads"] = torch.get_num_threads()
    last = {}

    def call():
        last["out"] = model(xt)
        return last["out"]

    def output():
        out = last["out"]
        return (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()

    return call, output, info


def worker(
    key: str, manifest: str, threads: int, rounds: int, warmup: int, json_out: str, save_output
) -> None:
    """One process, one runtime: load, ``warmup`` calls, then ``rounds`` timed calls."""
    import torch
    from _timing import warm_allocator

    with open(manifest) as f:
        man = json.load(f)
    x = np.load(man["input"])
    t0 = time.perf_counter()
    call, output, info = load(key, man, threads, x)
    load_s = time.perf_counter() - t0
    warm_allocator()  # as in every other benchmark: the allocator in a model's steady state
    samples, warm = [], []
    with torch.inference_mode():
        for _ in range(warmup):  # the first call of torch.compile compiles
            t0 = time.perf_counter()
            call()
            warm.append(time.perf_counter() - t0)
        for _ in range(rounds):
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
        if save_output:
            np.save(save_output, output())
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    result = {
        "key": key,
        "median ms": statistics.median(samples),
        "p25 ms": q[0],
        "p75 ms": q[2],
        "samples ms": samples,
        "load s": load_s,
        "warm-up call s": warm,
        "info": info,
        "output": save_output,
        # The hosts here are shared: what else ran while this process was timed.
        "load average 1 min": os.getloadavg()[0],
    }
    with open(json_out, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- parent side
def _kill_group(proc: subprocess.Popen) -> None:
    """End a worker we started and whatever it started (inductor's compile pool)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_subprocess(cmd: List[str], env: Dict[str, str], timeout: float) -> Tuple[int, str]:
    """Run ``cmd`` in its own process group; (return code, its stderr and stdout tail).
    Return code None: it ran past ``timeout`` seconds and was killed."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, ""
    return proc.returncode, out[-3000:]


def summarize(results: List[Dict[str, object]]) -> Dict[str, object]:
    """Median of the per-process medians, their spread ((max - min) / median), and the best of
    them: on a shared host another user's burst can slow a whole process, and the best process
    is the one least disturbed."""
    medians = [r["median ms"] for r in results]
    med = statistics.median(medians)
    return {
        "latency ms": med,
        "spread %": 100 * (max(medians) - min(medians)) / med,
        "best process ms": min(medians),
        "processes": len(medians),
        "process medians ms": medians,
    }
