"""One timing helper for every benchmark: interleaved runs, median, peak memory.

Candidates are timed round-robin (A B C A B C ...) so that a slow phase of the machine (another
process, frequency change) hits every candidate alike; the median of the rounds is reported.

Before the first timing, the C allocator is put in the state a model reaches in a user's process
(``warm_allocator``): dsconv_ext's first CPU call raises glibc's mmap and trim thresholds
(csrc/cpu/c_allocator.cpp), and every candidate, float ones and other runtimes included, is timed
in that same state. Without it, glibc serves blocks of more than 128 KB with fresh mmaps and a
benchmark whose first layer is the largest measured page faults, not convolutions: F.conv2d on
the YOLO11n stem took 2.7-4.8 ms cold and 0.46 ms warm.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

try:  # run from a checkout without installing: use the checkout's package
    import dsconv_ext
except ImportError:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dsconv_ext


def _sync(device: Optional[str]) -> None:
    if device is not None and device.startswith("cuda"):
        torch.cuda.synchronize()


_ALLOCATOR_WARM = False


def warm_allocator(megabytes: int = 31) -> None:
    """Put glibc's malloc in the state dsconv_ext leaves it in after its first CPU call (one tiny
    DSConv call), for every candidate alike; where the compiled kernel is missing, or
    DSCONV_EXT_SETTLE_ALLOCATOR=0, allocate and free one block just under glibc's largest dynamic
    mmap threshold (32 MB) instead, so that tensors up to that size come from the heap. Harmless
    with other allocators. Runs once per process."""
    global _ALLOCATOR_WARM
    if _ALLOCATOR_WARM:
        return
    if dsconv_ext.dsconv2d_backend("cpu") == "kernel":
        x = torch.zeros(1, 4, 3, 3)
        w = torch.zeros(4, 4, 1, 1, dtype=torch.int8)
        torch.ops.dsconv_ext.dsconv2d(
            x, w, torch.ones(4, 1, 1, 1), None, None, None, None,
            [1, 1], [0, 0], [1, 1], 1, 4, 8, False,
        )  # fmt: skip
    block = torch.empty(megabytes << 18, dtype=torch.float32)  # megabytes MiB
    block.fill_(0)
    del block
    _ALLOCATOR_WARM = True


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    rounds: int = 30,
    warmup: int = 3,
    device: Optional[str] = None,
    min_seconds: float = 0.0,
) -> Dict[str, float]:
    """Median wall time in milliseconds of each callable, measured interleaved.

    Args:
        fns: name -> zero-argument callable running one iteration.
        rounds: number of interleaved rounds (each round calls every candidate once, in an
            order shuffled per round with the round number as seed).
        warmup: untimed calls of each candidate first.
        device: 'cuda...' to synchronise around each call.
        min_seconds: keep adding rounds until the total measured time reaches this.
    """
    warm_allocator()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    r = 0
    names = list(fns)
    while r < rounds or (time.perf_counter() - start) < min_seconds:
        # A new order each round: a candidate that always follows the same one inherits its cache
        # footprint and spinning thread pool (several % slower after a large fp32 conv). Rotating
        # who goes first is not enough: it keeps every candidate's predecessor.
        order = names[:]
        random.Random(r).shuffle(order)
        for name in order:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_cuda_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_cpu_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CPU memory of one call, each allocation counted once.

    The profiler reports an op's memory inclusive of the ops it calls (``conv2d`` ->
    ``convolution`` -> ... -> ``mkldnn_convolution`` all show the same output buffer), so summing
    ``cpu_memory_usage`` over every event counts nested allocations several times; this walks
    ``self_cpu_memory_usage`` (what each op allocated or freed itself) instead.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if getattr(e, "self_cpu_memory_usage", 0) != 0),
        key=lambda e: e.time_range.start,
    )
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    """Print rows as a GitHub-markdown table (so it pastes into the README as is)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def dump_json(path_or_dash: str, payload: object) -> None:
    text = json.dumps(payload, indent=2)
    if path_or_dash == "-":
        print(text)
    else:
        with open(path_or_dash, "w") as f:
            f.write(text + "\n")


# CPU features that decide which int8 path runs (ours, oneDNN's, OpenVINO's).
ISA_FLAGS = (
    "avx2",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
    "asimddp",  # AArch64 dot product (dsconv_ext's neon_dot path; oneDNN's int8 on Arm)
    "i8mm",  # AArch64 int8 matrix multiply
)


def _cpu_model_and_flags(cpuinfo: str = None):
    """(CPU model, feature flags) from /proc/cpuinfo (or the text ``cpuinfo``): x86 lists its
    flags on "flags" lines, AArch64 on "Features" lines, and names the core only by its
    implementer and part numbers."""
    import platform

    fields = {}
    try:
        if cpuinfo is None:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux: the model from platform, no flags
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:  # hypervisors often shorten the name ("AMD EPYC"): say which
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    elif "CPU part" in fields and "model name" not in fields:
        model += (
            f" (CPU implementer {fields.get('CPU implementer', '?')}, part {fields['CPU part']})"
        )
    return model, set((fields.get("flags") or fields.get("Features", "")).split())


def environment() -> Dict[str, object]:
    """The machine and software a benchmark ran on: CPU model, cores, the threads used, the
    ISA features and the path dsconv_ext's CPU kernel takes, versions, GPU, date."""
    import datetime
    import os
    import platform

    model, flags = _cpu_model_and_flags()
    info: Dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa_features": [f for f in ISA_FLAGS if f in flags],
        "dsconv_cpu_path": _cpu_path(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dsconv_ext": getattr(dsconv_ext, "__version__", "?"),
    }
    try:
        import ultralytics

        info["ultralytics"] = ultralytics.__version__
    except ImportError:
        info["ultralytics"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_path() -> str:
    try:
        return dsconv_ext.dsconv2d_backend("cpu") == "kernel" and torch.ops.dsconv_ext.cpu_isa()
    except Exception as e:  # report, the benchmark still runs on the fallback
        return f"fallback ({type(e).__name__})"


def print_header(name: str, env: Dict[str, object]) -> None:
    """Two comment lines naming the machine: where a table was measured travels with it."""
    features = ", ".join(env["isa_features"]) or "none of " + "/".join(ISA_FLAGS)
    gpu = f"; GPU {env['gpu']}" if "gpu" in env else ""
    print(
        f"# {name} {env['date']}: {env['cpu']}, {env['cores']} cores, {env['threads']} threads; "
        f"ISA {features}; dsconv_ext CPU path {env['dsconv_cpu_path']}{gpu}"
    )
    print(
        f"# python {env['python']}, torch {env['torch']}, ultralytics {env['ultralytics']}, "
        f"dsconv_ext {env['dsconv_ext']}"
    )
