"""The Arm path of the CPU kernel (csrc/cpu/kernel_neon.cpp, neon_dot.h) and the AArch64 build.

No Arm CPU is needed:

* ``DSCONV_EXT_CPU_ISA=neon_model`` runs the Arm kernel with its dot-product instructions
  replaced by a software model (NeonModel). The parametrised kernel suites
  (test_dsconv_cpu_kernel.py, ...) compare it with the float64 reference like every path; here it
  must also give the portable path's outputs bit for bit, as its fold follows that path's.
* The real instructions: the microkernel ``segment_sums<NeonHw>`` is cross-compiled for AArch64
  with zig (pip ``ziglang``) and run under emulation (pip ``unicorn``, QEMU's AArch64 CPU with
  FEAT_DotProd), against exact integer sums computed here.
* Every C++ source is cross-compiled for aarch64-linux-gnu against this torch's headers, with
  clang (zig) and with GCC (``aarch64-linux-gnu-g++``, where installed), and linked into one
  shared library: the package's kernels build on Arm, nothing of ours is left undefined, and
  the Arm kernel holds SDOT instructions.

Where zig or unicorn is missing these tests skip (strict: fail; both are in requirements-dev.txt).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import skip_or_fail, use_isa
from dsconv_cases import random_case, wide_case
from dsconv_compare import exact

import dsconv_ext

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

needs_kernel = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)


def op(case):
    c = case
    return torch.ops.dsconv_ext.dsconv2d(
        c["x"], c["intweight"], c["alpha"], c.get("KDSb"), c.get("CDSw"), c.get("CDSb"),
        c.get("bias"), list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"],
        c["block_size"], c["act_bits"], c["fuse_silu"],
    )  # fmt: skip


@needs_kernel
def test_model_path_equals_the_portable_path_bit_for_bit(monkeypatch, threads):
    """Same packing, same integer sums (SDOT on m against corr + sum((m + 128) q)), same fold
    order: every output identical, on the shared random and wide cases, 1 and 2 threads."""
    int8_before = torch.ops.dsconv_ext._cpu_path_calls()[0]  # (int8, float, depthwise, ...)
    for i in range(40):
        torch.set_num_threads(1 + i % 2)
        for kind, case in (("random_case", random_case(i)), ("wide_case", wide_case(i))):
            use_isa(monkeypatch, "scalar")
            want = op(case)
            use_isa(monkeypatch, "neon_model")
            got = op(case)
            assert exact(got, want) is None, f"{kind}({i}): {exact(got, want)}"
    assert torch.ops.dsconv_ext._cpu_path_calls()[0] > int8_before, "no case took the int8 path"


# --- the real instructions, emulated --------------------------------------------------------------

# Leaf functions around the kernel's NeonHw code (flatten: everything inlined, so the machine code
# is self-contained), called with the AAPCS64 argument registers.
LEAVES = {
    "sums": r"""
#include "cpu/neon_dot.h"
extern "C" DSCONV_NEON_DOT __attribute__((flatten)) void leaf(const uint32_t* a, int64_t plane,
                                                              const int8_t* w, int64_t K4,
                                                              int32_t* S) {
  using namespace dsconv_ext::cpu;
  segment_sums<NeonHw>(a, plane, w, K4, reinterpret_cast<int32_t (*)[kNeonQTile]>(S));
}
""",
    "fold": r"""
#include "cpu/neon_dot.h"
extern "C" DSCONV_NEON_DOT __attribute__((flatten)) void leaf(
    const uint32_t* a, int64_t plane, const int8_t* w, int64_t K4, const float* alpha_kdsb,
    const float* scale, const float* usum, float* f) {
  using namespace dsconv_ext::cpu;
  segment_fold<NeonHw>(a, plane, w, K4, alpha_kdsb, scale, alpha_kdsb + 4, usum,
                       reinterpret_cast<float (*)[kNeonQTile]>(f));
}
""",
    "pack": r"""
#include "cpu/neon_dot.h"
extern "C" DSCONV_NEON_DOT __attribute__((flatten)) int64_t leaf(
    const float* x, int64_t cstride, int64_t nch_and_bits, int64_t K4, uint32_t* act,
    int64_t kplane, float* esc, float* usum) {  // (8 arguments: all in registers)
  using namespace dsconv_ext::cpu;
  const int64_t nch = nch_and_bits & 0xFFFF, bits = (nch_and_bits >> 32) & 0xFF;
  return (nch_and_bits >> 48) == 2
             ? pack_quad<NeonHw, 2>(x, cstride, nch, K4, int(bits), act, kplane, esc, usum)
             : pack_quad<NeonHw, 1>(x, cstride, nch, K4, int(bits), act, kplane, esc, usum);
}
""",
}


def zig_command():
    if importlib.util.find_spec("ziglang") is None:
        skip_or_fail("needs the zig C/C++ cross compiler (pip install ziglang)", should_run=True)
    return [sys.executable, "-m", "ziglang"]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, " ".join(map(str, cmd)) + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
    return r


def elf_sections(data: bytes) -> dict:
    """name -> (offset, size) of an ELF64 little-endian file's sections."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off = heads[shstrndx][4]
    out = {}
    for name, _, _, _, off, size, *_ in heads:
        end = data.index(b"\0", str_off + name)
        out[data[str_off + name : end].decode()] = (off, size)
    return out


@pytest.fixture(scope="module")
def leaf_code(tmp_path_factory):
    """Each leaf's machine code: AArch64, freestanding, position independent, no relocations."""
    zig = zig_command()
    d = tmp_path_factory.mktemp("neon_leaf")
    code = {}
    for name, src in LEAVES.items():
        (d / f"{name}.cpp").write_text(src)
        obj = d / f"{name}.o"
        run(zig + ["c++", "-target", "aarch64-freestanding-none", "-mcpu=generic", "-O2",
                   "-ffreestanding", "-fno-exceptions", "-fno-rtti", "-fno-builtin", "-fPIC",
                   f"-I{CSRC}", "-c", str(d / f"{name}.cpp"), "-o", str(obj)])  # fmt: skip
        data = obj.read_bytes()
        sections = elf_sections(data)
        # a relocation would point into memory the raw code does not carry
        assert ".rela.text" not in sections and ".text" in sections, (name, sorted(sections))
        off, size = sections[".text"]
        code[name] = data[off : off + size]
    return code


def emulate(code: bytes, args: list, buffers: list) -> tuple:
    """Runs `code` under unicorn (QEMU's AArch64 "max" CPU: FEAT_DotProd included) with the
    integer arguments `args`, where an ndarray argument is copied into emulated memory and passed
    by address; `buffers` are the indices of those read back after the call (same shape and
    dtype). Returns (X0, the buffers)."""
    if importlib.util.find_spec("unicorn") is None:
        skip_or_fail("needs the unicorn CPU emulator (pip install unicorn)", should_run=True)
    import unicorn
    from unicorn import arm64_const as a64

    emu = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM, cpu=a64.UC_CPU_ARM64_MAX)
    CODE, DATA, STACK = 0x10000, 0x1000000, 0x800000
    emu.mem_map(CODE, 0x10000)
    emu.mem_map(STACK - 0x10000, 0x20000)
    ret = CODE + len(code)
    emu.mem_write(CODE, code + b"\x00\x00\x20\xd4")  # BRK #0 where the leaf returns
    regs, where, at = [], {}, DATA
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            a = np.ascontiguousarray(a)
            size = (a.nbytes + 0xFFFF) & ~0xFFFF or 0x10000
            emu.mem_map(at, size)
            emu.mem_write(at, a.tobytes())
            where[i] = (at, a)
            regs.append(at)
            at += size + 0x10000  # an unmapped gap: a stray access faults
        else:
            regs.append(int(a) & (2**64 - 1))
    assert len(regs) <= 8
    for i, v in enumerate(regs):
        emu.reg_write(getattr(a64, f"UC_ARM64_REG_X{i}"), v)
    emu.reg_write(a64.UC_ARM64_REG_CPACR_EL1, 3 << 20)  # FPEN: Advanced SIMD at EL0/EL1
    emu.reg_write(a64.UC_ARM64_REG_SP, STACK)
    emu.reg_write(a64.UC_ARM64_REG_LR, ret)
    emu.emu_start(CODE, ret, count=50_000_000)
    assert emu.reg_read(a64.UC_ARM64_REG_PC) == ret, "the leaf did not return"
    out = []
    for i in buffers:
        addr, a = where[i]
        out.append(np.frombuffer(emu.mem_read(addr, a.nbytes), a.dtype).reshape(a.shape).copy())
    return emu.reg_read(a64.UC_ARM64_REG_X0), out


def emulate_segment_sums(code: bytes, act: np.ndarray, w: np.ndarray) -> np.ndarray:
    """segment_sums<NeonHw> on act [K4, plane] uint32 words and w [K4, 16] int8."""
    K4, plane = act.shape
    S = np.zeros((4, 16), np.int32)
    _, (S,) = emulate(code, [act.astype(np.uint32), plane, w.astype(np.int8), K4, S], [4])
    return S


def exact_segment_sums(act: np.ndarray, w: np.ndarray) -> np.ndarray:
    """S[r, q] = sum over groups k and channels i of (byte i of act[k, q] - 128) * w[k, 4r + i]."""
    K4, plane = act.shape
    m = act[:, :16].view(np.uint8).reshape(K4, 16, 4).astype(np.int64) - 128  # [k, q, i]
    wq = w.astype(np.int64).reshape(K4, 4, 4)  # [k, r, i]
    return np.einsum("kqi,kri->rq", m, wq)


@pytest.mark.parametrize("seed", range(6))
def test_sdot_microkernel_emulated(leaf_code, seed):
    """segment_sums<NeonHw> on the AArch64 instructions equals the exact integer sums: random
    bytes, the extremes (every mantissa -128 or 127 against every weight -128 or 127), and
    depths up to 256 groups (|S| up to 2^24)."""
    rng = np.random.default_rng(seed)
    K4 = [1, 3, 8, 17, 64, 256][seed]
    plane = 16 + int(rng.integers(0, 40))
    if seed % 2:
        act = rng.integers(0, 2**32, size=(K4, plane), dtype=np.uint64).astype(np.uint32)
        w = rng.integers(-128, 128, size=(K4, 16)).astype(np.int8)
    else:  # extremes: bytes 0x00 (m = -128) / 0xFF (m = 127), weights -128 / 127
        act = rng.choice(np.array([0x00000000, 0xFFFFFFFF, 0x00FF00FF], np.uint32), (K4, plane))
        w = rng.choice(np.array([-128, 127], np.int8), (K4, 16))
    got = emulate_segment_sums(leaf_code["sums"], act, w)
    want = exact_segment_sums(act, w)
    where = np.argwhere(got != want)[:3]
    assert np.array_equal(got, want), f"seed {seed}: first differences at [r, q] {where.tolist()}"


@pytest.mark.parametrize("seed", range(4))
def test_segment_fold_emulated(leaf_code, seed):
    """segment_fold<NeonHw>: f += (float(S) * alpha) * 2^E, then + kdsb * usum, each operation
    rounded on its own as on the portable path (numpy float32 here, bit for bit; a fused
    multiply-add for the KDS bias term differs in the last bit on 2-3 of the 64 outputs of the
    seeds with usum)."""
    rng = np.random.default_rng(200 + seed)
    K4, plane = [2, 8, 5, 32][seed], 24
    act = rng.integers(0, 2**32, size=(K4, plane), dtype=np.uint64).astype(np.uint32)
    w = rng.integers(-128, 128, size=(K4, 16)).astype(np.int8)
    alpha_kdsb = (rng.standard_normal(8) * 1e-3).astype(np.float32)
    scale = (2.0 ** rng.integers(-12, 4, 16)).astype(np.float32)
    usum = (rng.standard_normal(16) * 50).astype(np.float32)
    f0 = rng.standard_normal((4, 16)).astype(np.float32)
    with_usum = seed % 2 == 1
    args = [act, plane, w, K4, alpha_kdsb, scale, usum if with_usum else 0, f0.copy()]
    _, (f,) = emulate(leaf_code["fold"], args, [7])
    S = exact_segment_sums(act, w).astype(np.float32)
    want = f0 + (S * alpha_kdsb[:4, None]) * scale[None, :]
    if with_usum:
        want = want + alpha_kdsb[4:, None] * usum[None, :]
    assert want.dtype == np.float32
    assert np.array_equal(f, want), f"seed {seed}: max diff {np.abs(f - want).max()}"


def bfp_pack_reference(x: np.ndarray, K4: int, mant_bits: int):
    """What pack_quad stores for x [nch, 4] (semantics.md): per pixel E = floor(log2 max|x|) -
    (m - 2) (0 for an all-zero block), m = clamp(round_half_even(x / 2^E)); words [K4, 4] of
    m + 128 bytes, 2^E, and 2^E * sum(m) in float32."""
    nch = x.shape[0]
    amax = np.abs(x).max(axis=0).astype(np.float64)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - (mant_bits - 2), 0)
    lim = 2 ** (mant_bits - 1) - 1
    m = np.clip(np.rint(x.astype(np.float64) / 2.0**e), -lim, lim).astype(np.int64)
    full = np.zeros((4 * K4, 4), np.int64)
    full[:nch] = m
    b = (full + 128).astype(np.uint32).reshape(K4, 4, 4)  # [k, channel j, pixel]
    words = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
    scale = (2.0**e).astype(np.float32)
    return words.astype(np.uint32), scale, (scale * m.sum(axis=0).astype(np.float32))


@pytest.mark.parametrize("seed", range(8))
def test_vector_pack_emulated(leaf_code, seed):
    """pack_quad<NeonHw> on the AArch64 instructions: the BFP words, 2^E and 2^E * sum(m) of 4
    pixels, for mantissa widths 2..8, partial last groups, all-zero pixels, magnitudes from 1e-30
    to 1e30, and exact ties (x / 2^E = k + 1/2); pixels 1 or 2 floats apart (odd seeds: a stride-2
    conv's phase row, NaN between the pixels, never read into a block); refused (nothing stored)
    for NaN, Inf and subnormal blocks."""
    rng = np.random.default_rng(100 + seed)
    mant_bits = [8, 7, 5, 2, 8, 3, 8, 6][seed]
    stride = 1 + seed % 2
    nch = int(rng.integers(1, 37))
    K4 = (nch + 3) // 4
    # floats from one channel's pixels to the next's
    cstride = 4 * stride + int(rng.integers(0, 9))
    x = (rng.standard_normal((nch, 4)) * 10.0 ** rng.integers(-30, 31, (1, 4))).astype(np.float32)
    if seed == 4:
        x[:, 2] = 0.0  # an all-zero block: E = 0
    if seed == 6:  # ties: max 2^(m-1) - 1 sets E = 0, then x = k + 0.5
        x[0] = 127.0
        x[1:] = rng.integers(-126, 126, (nch - 1, 4)) + 0.5
    plane = np.zeros((nch, cstride), np.float32)
    if stride == 2:
        plane[:, 1:8:2] = np.nan
    plane[:, 0 : 4 * stride : stride] = x
    kplane = 4 + int(rng.integers(0, 5))  # dwords from one group's 4 pixels to the next's
    act = np.full((K4, kplane), 0xDEADBEEF, np.uint32)
    esc = np.full(4, -1.0, np.float32)
    usum = np.full(4, -1.0, np.float32)
    ok, (act, esc, usum) = emulate(
        leaf_code["pack"],
        [plane, cstride, nch | mant_bits << 32 | stride << 48, K4, act, kplane, esc, usum],
        [4, 6, 7],
    )
    words, scale, us = bfp_pack_reference(x, K4, mant_bits)
    assert ok == 1, f"seed {seed}: refused a finite normal block"
    assert np.array_equal(act[:, :4], words), f"seed {seed}: words differ"
    assert (act[:, 4:] == 0xDEADBEEF).all(), f"seed {seed}: stored past the 4 pixels"
    assert np.array_equal(esc, scale) and np.array_equal(usum, us), f"seed {seed}"

    for bad in (np.nan, np.inf, 1e-40):  # the caller packs these pixels one by one
        y = plane.copy()
        if bad == 1e-40:  # a block of subnormals: 2^-E would not be a float
            y[:, stride] = np.float32(1e-40)
        else:
            y[nch - 1, stride] = bad
        act0 = np.full((K4, kplane), 0xDEADBEEF, np.uint32)
        esc0 = np.full(4, -1.0, np.float32)
        ok, (act1, esc1) = emulate(
            leaf_code["pack"],
            [y, cstride, nch | mant_bits << 32 | stride << 48, K4, act0, kplane, esc0, 0],
            [4, 6],
        )
        assert ok == 0 and (act1 == 0xDEADBEEF).all() and (esc1 == -1).all(), (seed, bad)


# --- the AArch64 build of every source -------------------------------------------------------


GCC_AARCH64 = "aarch64-linux-gnu-g++"


def aarch64_compiler(name: str):
    """(compile command, link command) of one AArch64 cross compiler: clang (zig, pip) or GCC
    (Debian's g++-aarch64-linux-gnu, which .ci/run installs where apt-get can)."""
    if name == "clang":
        zig = zig_command()
        target = ["-target", "aarch64-linux-gnu"]
        # -O1: the build check, not the kernels' speed (-O3 takes twice as long under zig).
        return zig + ["c++", *target, "-O1"], zig + ["c++", *target]
    gxx = shutil.which(GCC_AARCH64)
    if gxx is None:
        pytest.skip(f"needs GCC for AArch64 ({GCC_AARCH64}: apt-get install g++-aarch64-linux-gnu)")
    # setup.py's flags, and -Wall: GCC is what `pip install .` runs on most Arm Linux machines.
    return [gxx, "-O3", "-Wall"], [gxx]


@pytest.mark.parametrize("compiler", ["clang", "gcc"])
def test_every_source_builds_for_aarch64(tmp_path, compiler):
    """csrc/*.cpp and csrc/cpu/*.cpp compile for aarch64-linux-gnu with this torch's headers (the
    x86 kernels compile to stubs there), with clang and with GCC (no warning of GCC's -Wall in
    our sources), and link into one shared library in which nothing of dsconv_ext is undefined;
    the Arm kernel holds SDOT instructions (encoding 0x4f80e000 with its register and lane
    fields masked: SDOT Vd.4S, Vn.16B, Vm.4B[lane])."""
    from torch.utils import cpp_extension

    cc, link = aarch64_compiler(compiler)
    sources = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    # torch's and Python's headers as system headers: their own warnings are not ours to fix.
    includes = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes += [f"-isystem{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    flags = ["-std=c++20", "-fPIC", "-fvisibility=hidden"]
    objs = []
    procs = []
    logs = []
    for src in sources:
        obj = tmp_path / (src.parent.name + "_" + src.stem + ".o")
        cmd = cc + [*flags, *includes, "-c", str(src), "-o", str(obj)]
        procs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        objs.append(obj)
        if len(procs) >= max(2, os.cpu_count() or 2):
            logs.append(_wait(procs.pop(0)))
    for p in procs:
        logs.append(_wait(p))
    # (a warning raised inside a system header but instantiated from our code still shows)
    warned = [log for log in logs if "warning:" in log]
    assert not warned, "warnings in our sources:\n" + "\n".join(w[-3000:] for w in warned[:3])
    lib = tmp_path / "_C.so"
    run(link + ["-shared", "-o", str(lib), *map(str, objs), "-Wl,--allow-shlib-undefined"])
    undefined = _undefined_symbols(lib.read_bytes())
    ours = [s for s in undefined if "dsconv_ext" in s]
    assert not ours, f"undefined in the AArch64 library: {ours[:10]}"
    neon = (tmp_path / "cpu_kernel_neon.o").read_bytes()
    text_words = []
    for name, (o, s) in elf_sections(neon).items():
        if name == ".text" or name.startswith(".text."):
            text_words += list(struct.unpack_from(f"<{s // 4}I", neon, o))
    sdot = [w for w in text_words if w & 0xBFC0F400 == 0x0F80E000]
    assert len(sdot) >= 16, f"{len(sdot)} SDOT (by element) instructions in kernel_neon.o"


def _wait(item) -> str:
    src, proc = item
    out, _ = proc.communicate(timeout=900)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{src}:\n{text[-4000:]}"
    return text


def _undefined_symbols(data: bytes) -> list:
    """Names of the undefined (st_shndx 0, non-empty) symbols in an ELF64 file's .dynsym."""
    sections = elf_sections(data)
    sym_off, sym_size = sections[".dynsym"]
    str_off, _ = sections[".dynstr"]
    names = []
    for i in range(1, sym_size // 24):
        st_name, _, _, st_shndx, _, _ = struct.unpack_from("<IBBHQQ", data, sym_off + 24 * i)
        if st_shndx == 0 and st_name:
            end = data.index(b"\0", str_off + st_name)
            names.append(data[str_off + st_name : end].decode())
    return names
