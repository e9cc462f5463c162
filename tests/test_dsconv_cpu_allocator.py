"""The first CPU DSConv call settles glibc's malloc (csrc/cpu/c_allocator.cpp): afterwards a
block of up to 256 MiB comes from the heap instead of a fresh mmap that faults in on every use.

Checked by what glibc reports (``mallinfo2``'s mmapped bytes) in a fresh process, so that nothing
earlier in the test session has moved the thresholds. Page-fault counts of whole models are not
asserted here (they depend on heap layout; docs/benchmarks.md has the measured figures)."""

import json
import platform
import subprocess
import sys

import pytest
from conftest import package_env

import dsconv_ext

pytestmark = [
    pytest.mark.skipif(
        dsconv_ext.dsconv2d_backend("cpu") != "kernel",
        reason="the compiled CPU kernel is not loaded",
    ),
    pytest.mark.skipif(
        sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
        reason="the allocator settle is for glibc's malloc",
    ),
]

PROBE = r"""
import ctypes, json
import torch
import dsconv_ext
assert dsconv_ext._loader.load_library().loaded

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print(json.dumps({"skip": "glibc older than 2.33 has no mallinfo2"}))
    raise SystemExit(0)
libc.mallinfo2.restype = MallInfo2

def allocate(numel):
    before = libc.mallinfo2().hblkhd
    t = torch.empty(numel)
    return t, libc.mallinfo2().hblkhd - before >= numel * 4

state_before = torch.ops.dsconv_ext.cpu_allocator_state()
a, a_mmapped = allocate(5 << 20)  # 20 MiB: above glibc's threshold in a fresh process
x = torch.randn(1, 8, 5, 5)
w = torch.randint(-3, 4, (8, 8, 3, 3), dtype=torch.int8)
torch.ops.dsconv_ext.dsconv2d(x, w, torch.ones(8, 1, 3, 3), None, None, None, None,
                              [1, 1], [1, 1], [1, 1], 1, 8, 8, False)
del a  # glibc's own rule raises its threshold to this block's size, 20 MiB
b, b_mmapped = allocate(25 << 20)  # 100 MiB: above glibc's 32 MiB cap, below the settled 256
print(json.dumps({"a_mmapped": a_mmapped, "b_mmapped": b_mmapped,
                  "state_before": state_before,
                  "state": torch.ops.dsconv_ext.cpu_allocator_state()}))
"""


def run_probe(extra_env):
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=package_env(extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def test_first_call_serves_large_blocks_from_the_heap():
    r = run_probe({})
    assert r["state_before"].startswith("pending")
    assert r["a_mmapped"], "precondition: a fresh process mmaps a 20 MiB block"
    assert not r["b_mmapped"], f"a 100 MiB block was still mmapped after the first call: {r}"
    assert r["state"].startswith("settled")


@pytest.mark.parametrize(
    "env,why",
    [
        ({"DSCONV_EXT_SETTLE_ALLOCATOR": "0"}, "DSCONV_EXT_SETTLE_ALLOCATOR=0"),
        ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, "malloc tuned through the environment"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}, "malloc tuned"),
    ],
)
def test_opt_outs_leave_the_allocator_alone(env, why):
    r = run_probe(env)
    assert r["a_mmapped"]
    assert r["b_mmapped"], f"{env} still moved the threshold: {r}"
    assert r["state"].startswith("left alone") and why in r["state"], r["state"]


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, "settled"),
        ({"DSCONV_EXT_SETTLE_ALLOCATOR": "0"}, "left alone (DSCONV_EXT_SETTLE_ALLOCATOR=0)"),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "left alone (malloc tuned"),
    ],
)
def test_info_reports_the_allocator(env, expected):
    done = subprocess.run(
        [sys.executable, "-m", "dsconv_ext", "info", "--json"],
        env=package_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in json.loads(done.stdout)["dsconv2d"]["cpu"]["allocator"]
