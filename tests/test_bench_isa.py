"""bench_isa.py builds what it claims to time: each generated loop body holds the named
instructions, ten of them, alternating for a pair; rows for extensions this CPU lacks say which
flag is missing, and the others carry consistent rates. No speed is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from yolo_helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_isa  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


@pytest.mark.parametrize("name", list(bench_isa.KERNELS))
def test_loop_body_holds_the_named_instructions(name, tmp_path):
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils) to read the compiled loop")
    _, ops, _ = bench_isa.KERNELS[name]
    src, exe = tmp_path / "k.c", tmp_path / "k"
    src.write_text(bench_isa._source(ops, iters=1, reps=1))
    subprocess.run(["cc", "-O1", "-o", str(exe), str(src)], check=True)
    asm = subprocess.run(["objdump", "-d", str(exe)], capture_output=True, text=True).stdout
    body = [line.split("\t")[-1].strip() for line in asm.splitlines() if "%ymm14" in line
            or "%zmm14" in line]  # fmt: skip
    mnemonics = [line.split()[-2] for line in body]
    want = [op.split()[-4] for op in ops]
    assert mnemonics == [want[r % len(want)] for r in range(bench_isa.CHAINS)], body
    # ten independent chains: each instruction writes its own register
    dests = [line.split(",")[-1] for line in body]
    assert len(set(dests)) == bench_isa.CHAINS, body


def test_rows_for_every_kernel(tmp_path):
    out = tmp_path / "isa.json"
    assert bench_isa.main(["--iters", "1000", "--reps", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = {r["instructions"]: r for r in payload["rows"]}
    assert list(rows) == list(bench_isa.KERNELS)
    _, flags = bench_isa._cpu_model_and_flags()
    for name, (need, _, macs) in bench_isa.KERNELS.items():
        row = rows[name]
        if need <= flags:
            ns = row["ns per instruction"]
            assert ns > 0 and "skipped" not in row, row
            assert row["MACs per ns"] == pytest.approx(sum(macs) / len(macs) / ns, rel=0.02)
        else:
            assert row["skipped"] == "needs " + ", ".join(sorted(need)), row
    assert payload["env"]["cpu"]
