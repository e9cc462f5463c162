"""Throughput of the instructions that bound the DSConv CPU kernel, on this core.

The int8 paths are only worth their packing and per-(block, tap) float fold where the CPU issues
integer multiply-adds faster than float FMAs. This measures it: each row runs ten independent
chains of one instruction (or of an alternating pair) in a loop, on one core, and reports
instructions per nanosecond and multiply-accumulates per nanosecond (ymm: ``vpmaddwd`` 16,
``vpmaddubsw`` 32 (before its int16 pair sums are widened), ``vfmadd231ps`` 8; zmm: ``vpdpbusd``
64, ``vfmadd231ps`` 16). The pair rows show whether two instructions share an execution pipe (a
pair at the rate of one instruction alone shares it).

Needs a C compiler (``cc``, as for building the package); rows for ISA extensions this CPU lacks
(AVX-512 VNNI, AVX-VNNI) are skipped.

    python benchmarks/bench_isa.py
    python benchmarks/bench_isa.py --json isa.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (  # noqa: E402
    _cpu_model_and_flags,
    dump_json,
    environment,
    print_header,
    print_table,
)

# name -> (required /proc/cpuinfo flags, instructions of one group (AT&T operands appended),
# MACs per instruction)
_Y = " %%ymm14, %%ymm15, %%ymm{r}"
_Z = " %%zmm14, %%zmm15, %%zmm{r}"
KERNELS = {
    "vpmaddwd ymm": ({"avx2"}, ["vpmaddwd" + _Y], [16]),
    "vpmaddubsw ymm": ({"avx2"}, ["vpmaddubsw" + _Y], [32]),
    "vfmadd231ps ymm": ({"avx2", "fma"}, ["vfmadd231ps" + _Y], [8]),
    "vpmaddwd + vfmadd231ps ymm": (
        {"avx2", "fma"},
        ["vpmaddwd" + _Y, "vfmadd231ps" + _Y],
        [16, 8],
    ),
    # the u8 x s8 dot product without VNNI: int16 pair sums, widened by a multiply with ones
    "vpmaddubsw + vpmaddwd (widening) ymm": (
        {"avx2"},
        ["vpmaddubsw" + _Y, "vpmaddwd" + _Y],
        [32, 0],
    ),
    "vpdpbusd ymm (AVX-VNNI)": ({"avx_vnni"}, ["%{{vex%}} vpdpbusd" + _Y], [32]),
    "vpdpbusd zmm": ({"avx512_vnni"}, ["vpdpbusd" + _Z], [64]),
    "vfmadd231ps zmm": ({"avx512f"}, ["vfmadd231ps" + _Z], [16]),
    "vpdpbusd + vfmadd231ps zmm": (
        {"avx512_vnni"},
        ["vpdpbusd" + _Z, "vfmadd231ps" + _Z],
        [64, 16],
    ),
}
CHAINS = 10

_C = r"""
#include <stdio.h>
#include <time.h>
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
int main(int argc, char** argv) {
  long iters = %(iters)d;
  double best = 1e30;
  for (int rep = 0; rep < %(reps)d; ++rep) {
    double t0 = now();
    for (long i = 0; i < iters; ++i) {
      __asm__ volatile(%(body)s ::: %(clobbers)s);
    }
    double dt = now() - t0;
    if (dt < best) best = dt;
  }
  printf("%%.6e\n", best / ((double)iters * %(chains)d));  /* seconds per instruction */
  return 0;
}
"""


def _source(ops, iters: int, reps: int) -> str:
    lines = [ops[r % len(ops)].format(r=r) for r in range(CHAINS)]
    body = " ".join('"' + line + '\\n"' for line in lines)
    regs = ([f"zmm{r}" for r in range(16)] if any("zmm" in o for o in ops) else []) + [
        f"xmm{r}" for r in range(16)
    ]
    clobbers = ", ".join(f'"{r}"' for r in regs)
    return _C % {"iters": iters, "reps": reps, "body": body, "clobbers": clobbers, "chains": CHAINS}


def measure(name: str, iters: int, reps: int, workdir: str):
    """(ns per instruction, MACs per ns) of one kernel, or None when it cannot run here."""
    _, ops, macs = KERNELS[name]
    src = os.path.join(workdir, "k.c")
    exe = os.path.join(workdir, "k")
    with open(src, "w") as f:
        f.write(_source(ops, iters, reps))
    subprocess.run(["cc", "-O1", "-o", exe, src], check=True, capture_output=True, text=True)
    sec = float(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)
    ns = sec * 1e9
    mean_macs = sum(macs) / len(macs)
    return ns, mean_macs / ns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20_000_000, help="loop trips per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (the fastest counts)")
    ap.add_argument("--json", help="write the header and rows here")
    args = ap.parse_args(argv)
    if shutil.which("cc") is None:
        print("bench_isa: needs a C compiler (cc)", file=sys.stderr)
        return 1
    env = environment()
    print_header("bench_isa", env)
    print(f"# one core, {CHAINS} independent chains per loop, fastest of {args.reps} repetitions")
    _, flags = _cpu_model_and_flags()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (need, _, _) in KERNELS.items():
            if not need <= flags:
                rows.append({"instructions": name, "skipped": "needs " + ", ".join(sorted(need))})
                continue
            ns, macs_per_ns = measure(name, args.iters, args.reps, tmp)
            rows.append(
                {
                    "instructions": name,
                    "ns per instruction": round(ns, 4),
                    "instructions per ns": round(1 / ns, 2),
                    "MACs per ns": round(macs_per_ns, 1),
                }
            )
    cols = ["instructions", "ns per instruction", "instructions per ns", "MACs per ns", "skipped"]
    print_table(rows, cols)
    if args.json:
        dump_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
