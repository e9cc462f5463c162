"""``python -m dsconv_ext selfcheck``: check the GPU kernels on this machine.

- default: the DSConv CUDA kernels against the reference (host emulation of their tiling on any
  machine, every kernel variant on a GPU); checks in :mod:`dsconv_ext.dsconv.gpu_checks`;
- ``--compile-only``: no GPU needed: every BRA Triton launch configuration compiled for real
  targets (registers, spills, shared memory) and the CUDA kernels' resources
  (:mod:`dsconv_ext.bra.compile_check`);
- ``--all`` (from a source checkout, on a GPU machine): the compile-only table, the DSConv checks,
  every GPU test (``pytest -m cuda``; a skipped GPU test is a failure here), compute-sanitizer
  racecheck / synccheck / initcheck on a small case of each kernel when ``compute-sanitizer`` is
  on the PATH, and the GPU rows of ``bench_conv_cuda`` and ``bench_bra``; one JSON report and a
  summary table.

Exit status: 0 all checks passed, 1 a check failed, 2 the GPU checks could not run (no CUDA
device, or a library built without CUDA kernels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional

import torch

from .dsconv.gpu_checks import emulator_checks, gpu_checks

__all__ = ["junit_counts", "main", "sanitizer_workload"]

SANITIZER_TOOLS = ("racecheck", "synccheck", "initcheck")


class _Report:
    def __init__(self) -> None:
        self.failed: List[str] = []
        self.passed = 0

    def check(self, name: str, fn: Callable[[], Optional[str]]) -> None:
        t0 = time.perf_counter()
        try:
            problem = fn()
        except Exception as e:  # a crash is a failed check, reported like one
            problem = f"{type(e).__name__}: {e}"
        dt = time.perf_counter() - t0
        if problem:
            self.failed.append(name)
            print(f"FAIL  {name} ({dt:.1f} s): {problem}", flush=True)
        else:
            self.passed += 1
            print(f"ok    {name} ({dt:.1f} s)", flush=True)


def _checkout_root() -> Optional[str]:
    """The source checkout this package sits in (tests/ and benchmarks/ beside it), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "tests")) and os.path.isdir(
        os.path.join(root, "benchmarks")
    ):
        return root
    return None


def _no_gpu_reason() -> str:
    """Why the GPU checks cannot run here, or '' when they can."""
    from ._loader import load_library

    status = load_library()
    if not status.loaded:
        return f"the compiled library is not loaded ({status.reason})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("dsconv_ext::dsconv2d", "CUDA"):
        return "the library was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return ""


def _device_checks(seeds: int, device_name: str = "cuda") -> Dict:
    rep = _Report()
    if hasattr(torch.ops.dsconv_ext, "cuda_tiling_selftest"):
        for check in emulator_checks(max(seeds // 4, 3)):
            rep.check(*check)
    why_not = _no_gpu_reason()
    if not why_not:
        device = torch.device(device_name)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cap = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
        archs = torch.ops.dsconv_ext.cuda_archs()
        print(f"device: {torch.cuda.get_device_name(device)} ({cap}); kernels built for {archs}")
        with torch.cuda.device(device):
            for check in gpu_checks(device, seeds):
                rep.check(*check)
    return {"passed": rep.passed, "failed": rep.failed, "why_not": why_not}


# ---------------------------------------------------------------- --all stages
def junit_counts(path: str) -> Dict:
    """Tests, failures, errors and skips (with their names) of a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skipped_names": []}
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            out["failures"] += 1
        elif case.find("error") is not None:
            out["errors"] += 1
        elif case.find("skipped") is not None:
            out["skipped"] += 1
            out["skipped_names"].append(name)
    return out


def _run(cmd: List[str], cwd: Optional[str], log: str, timeout: float, env=None) -> int:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        try:
            return subprocess.run(
                cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nTIMEOUT after {timeout} s\n")
            return -1


def _stage_pytest(root: str, out: str) -> Dict:
    xml = os.path.join(out, "pytest_cuda.xml")
    env = dict(os.environ, DSCONV_EXT_STRICT_SKIPS="1")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "tests"]  # fmt: skip
    rc = _run(cmd, root, os.path.join(out, "pytest_cuda.log"), 420, env)
    if not os.path.isfile(xml):
        return {"ok": False, "summary": f"pytest exit {rc}, no report (see pytest_cuda.log)"}
    c = junit_counts(xml)
    ok = rc == 0 and c["tests"] > 0 and not (c["failures"] or c["errors"] or c["skipped"])
    summary = (
        f"{c['tests']} GPU tests: {c['failures']} failed, {c['errors']} errors, "
        f"{c['skipped']} skipped (a skip fails here)"
    )
    return {"ok": ok, "summary": summary, **c}


def sanitizer_workload() -> None:
    """A small case of each CUDA DSConv kernel variant and of the BRA Triton kernels, forward
    and backward: what compute-sanitizer watches."""
    from .bra import BiLevelRoutingAttention
    from .dsconv.gpu_checks import GPU_VARIANTS, op_args, random_problem

    for dtype in (torch.float32, torch.float16):
        case = random_problem(3, "cuda", dtype, big=True)
        for variant in GPU_VARIANTS:
            torch.ops.dsconv_ext.dsconv2d_cuda_variant(*op_args(case), variant)
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(64, num_heads=4, n_win=2, topk=2).cuda()
    x = torch.randn(2, 64, 8, 8, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    torch.cuda.synchronize()


def _stage_sanitizer(out: str) -> Dict:
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return {"ok": True, "summary": "compute-sanitizer not on the PATH: not run"}
    results = {}
    workload = "from dsconv_ext.selfcheck import sanitizer_workload; sanitizer_workload()"
    for check in SANITIZER_TOOLS:
        cmd = [tool, "--tool", check, "--error-exitcode", "1", sys.executable, "-c", workload]
        results[check] = _run(cmd, None, os.path.join(out, f"sanitizer_{check}.log"), 600)
    bad = [k for k, rc in results.items() if rc != 0]
    summary = ", ".join(f"{k} {'ok' if rc == 0 else f'exit {rc}'}" for k, rc in results.items())
    return {"ok": not bad, "summary": summary, "exit": results}


def _stage_benchmarks(root: str, out: str) -> Dict:
    bench = os.path.join(root, "benchmarks")
    runs = {
        "bench_conv_cuda": [os.path.join(bench, "bench_conv_cuda.py"), "--batches", "1,16",
                            "--rounds", "10"],
        "bench_bra": [os.path.join(bench, "bench_bra.py"), "--device", "cuda", "--batch", "16",
                      "--layers", "P3", "--seconds", "10"],
    }  # fmt: skip
    result: Dict = {"ok": True, "files": {}}
    notes = []
    for name, args in runs.items():
        path = os.path.join(out, f"{name}.json")
        rc = _run([sys.executable, *args, "--json", path], root,
                  os.path.join(out, f"{name}.log"), 300)  # fmt: skip
        result["ok"] &= rc == 0
        result["files"][name] = path
        notes.append(f"{name} {'ok' if rc == 0 else f'exit {rc}'}")
        if rc == 0:
            with open(path) as f:
                result[name] = json.load(f)
    result["summary"] = ", ".join(notes) + _bench_headline(result)
    return result


def _bench_headline(result: Dict) -> str:
    """The figures the goals are stated in, from the benchmarks' JSON."""
    parts = []
    for row in result.get("bench_conv_cuda", {}).get("summary", []):
        if row.get("batch") == 16 and "geomean x f16" in row:
            parts.append(f"DSConv {row['kernel']} b16 {row['geomean x f16']:.2f}x cuDNN fp16")
    for row in result.get("bench_bra", {}).get("rows", []):
        if row.get("backend") == "triton" and row.get("pass") == "fwd+bwd":
            mem = f", {row['mem x']:.1f}x less memory" if "mem x" in row else ""
            parts.append(f"BRA {row['scale']} P3 b{row['batch']} fwd+bwd {row['x ref']:.2f}x{mem}")
    return ("; " + "; ".join(parts)) if parts else ""


def _run_all(args) -> int:
    from .bra.compile_check import compile_only, parse_archs

    out = args.out or f"selfcheck-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    os.makedirs(out, exist_ok=True)
    root = _checkout_root()
    stages: Dict[str, Dict] = {}

    def stage(name: str, fn: Callable[[], Dict]) -> None:
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # a crashed stage is a failed one, reported like one
            res = {"ok": False, "summary": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        stages[name] = res

    stage("compile-only", lambda: compile_only(parse_archs(args.arch), False, None))
    why_not = _no_gpu_reason()
    if root is None:
        why_not = why_not or "not a source checkout (tests/ and benchmarks/ are needed)"
    if why_not:
        for name in ("device checks", "pytest -m cuda", "compute-sanitizer", "benchmarks"):
            stages[name] = {"ok": None, "summary": f"not run: {why_not}", "seconds": 0}
    else:

        def device() -> Dict:
            r = _device_checks(args.seeds)
            n = r["passed"] + len(r["failed"])
            return {"ok": not r["failed"], "summary": f"{r['passed']} of {n} passed", **r}

        stage("device checks", device)
        stage("pytest -m cuda", lambda: _stage_pytest(root, out))
        stage("compute-sanitizer", lambda: _stage_sanitizer(out))
        stage("benchmarks", lambda: _stage_benchmarks(root, out))
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "stages": stages,
    }
    path = os.path.join(out, "selfcheck_report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("\n| stage | result | seconds | summary |\n|---|---|---|---|")
    for name, res in stages.items():
        verdict = {True: "PASS", False: "FAIL", None: "NOT RUN"}[res["ok"]]
        print(f"| {name} | {verdict} | {res['seconds']} | {res['summary']} |")
    print(f"report: {path}")
    if any(res["ok"] is False for res in stages.values()):
        print("VERDICT: FAIL")
        return 1
    if why_not:
        print(f"VERDICT: NOT RUN on a GPU: {why_not}")
        return 2
    print("VERDICT: PASS")
    return 0


def _pytest_check(rep: _Report) -> None:
    """The repository's CUDA test file, in a subprocess, where the checkout has one."""
    root = _checkout_root()
    path = os.path.join(root or "", "tests", "test_dsconv_cuda.py")
    if root is None or not os.path.isfile(path):
        print("skip  pytest: no tests/test_dsconv_cuda.py next to this package (not a checkout)")
        return

    def run() -> Optional[str]:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        tail = (out.stdout.strip().splitlines() or [""])[-1]
        print(f"      pytest: {tail}")
        return None if out.returncode == 0 else f"pytest exit {out.returncode}: {tail}"

    rep.check("pytest tests/test_dsconv_cuda.py", run)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dsconv_ext selfcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, default=40, help="random problems per check")
    p.add_argument("--device", default="cuda", help="CUDA device to check (default: current)")
    p.add_argument("--quick", action="store_true", help="a few problems only")
    p.add_argument(
        "--pytest",
        action="store_true",
        help="also run tests/test_dsconv_cuda.py with pytest when this is a source checkout",
    )
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU: compile the BRA Triton kernels for --arch (ptxas: registers, spills, shared "
        "memory) and list the CUDA DSConv kernels' resources; default: a representative set "
        "(see dsconv_ext.bra.compile_check.representative), --full: the whole grid",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="everything, on a GPU machine from a source checkout, in under 10 minutes: "
        "compile-only, device checks, pytest -m cuda, compute-sanitizer, GPU benchmarks",
    )
    p.add_argument("--out", help="--all: folder for the report and logs")
    p.add_argument("--arch", default="80,86,89,90", help="compile targets (sm_XX numbers)")
    p.add_argument("--full", action="store_true", help="--compile-only: the whole shape grid")
    p.add_argument("--json", metavar="PATH", help="--compile-only: also write the rows as JSON")
    args = p.parse_args(argv)
    if args.compile_only:  # offline resource checks: no library, no GPU needed
        from .bra.compile_check import selfcheck_compile_only

        return selfcheck_compile_only(args.arch, args.full, args.json)
    if args.all:
        return _run_all(args)
    seeds = 6 if args.quick else max(args.seeds, 1)
    print(f"dsconv_ext selfcheck: torch {torch.__version__}, CUDA build {torch.version.cuda}")
    from ._loader import load_library

    status = load_library()
    if not status.loaded:
        print(f"VERDICT: NOT RUN: the compiled library is not loaded ({status.reason})")
        return 2
    print(f"library: {status.how} {status.path}")
    result = _device_checks(seeds, args.device)
    rep = _Report()
    rep.passed, rep.failed = result["passed"], list(result["failed"])
    if args.pytest:
        _pytest_check(rep)
    if rep.failed:
        print(
            f"VERDICT: FAIL ({len(rep.failed)} of {rep.passed + len(rep.failed)} checks "
            f"failed: {', '.join(rep.failed)})"
        )
        return 1
    if result["why_not"]:
        print(f"VERDICT: NOT RUN on a GPU: {result['why_not']} ({rep.passed} host checks passed)")
        return 2
    print(f"VERDICT: PASS ({rep.passed} checks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
