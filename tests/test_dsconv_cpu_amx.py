"""The AMX path of the CPU kernel (csrc/cpu/kernel_amx.cpp, amx_tiles.h, amx_model.cpp).

Two layers are tested:

* The tile layer: programs of AMX instructions run through ``_amx_tile_selftest`` on the
  software model (any machine) and on the real tiles (AMX machines only), against ``TileRef``
  below, a numpy transcription of the "Operation" pseudo-code of LDTILECFG, TILELOADD,
  TILESTORED, TILEZERO, TILERELEASE and TDPBSSD / TDPBSUD / TDPBUSD / TDPBUUD in the Intel SDM.
* The convolution: DSCONV_EXT_CPU_ISA=amx_model (the AMX microkernel on the model) and =amx
  against the float64 reference, exactly where the outputs are integer sums, and bit for bit
  against the AVX-512 path, whose fold the AMX kernel shares.

A failing random case names its seed.
"""

import math

import numpy as np
import pytest
import torch
from conftest import use_isa
from dsconv_cases import random_case
from test_dsconv_cpu_kernel import assert_close, describe, op, wide_case

import dsconv_ext
from dsconv_ext import dsconv2d_reference
from dsconv_ext.dsconv.quant_primitives import quantize_weight

pytestmark = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)

AMX_ISAS = ("amx", "amx_model")


@pytest.fixture(params=AMX_ISAS)
def amx_isa(request, monkeypatch):
    use_isa(monkeypatch, request.param)
    return request.param


# --- The tile layer ----------------------------------------------------------------------------

# Opcodes of _amx_tile_selftest programs (TileOp in amx_tiles.h); 6 ints per instruction:
# opcode, three tile numbers, byte offset, row stride.
CFG, LOAD, STORE, ZERO, DP_SS, DP_SU, DP_US, DP_UU, RELEASE = range(9)
DP_SIGNS = {DP_SS: (True, True), DP_SU: (True, False), DP_US: (False, True), DP_UU: (False, False)}


class AmxFault(Exception):
    pass


def make_config(rows, colsb, palette=1, start_row=0):
    """The 64-byte LDTILECFG operand: palette, start_row, 14 reserved bytes, colsb[16] (uint16),
    rows[16]."""
    b = np.zeros(64, np.uint8)
    b[0], b[1] = palette, start_row
    cb = np.zeros(16, "<u2")
    cb[: len(colsb)] = colsb
    b[16:48] = cb.view(np.uint8)
    b[48 : 48 + len(rows)] = rows
    return b


class TileRef:
    """The SDM pseudo-code of the AMX instructions, palette 1 (8 tiles of 16 rows x 64 bytes)."""

    def __init__(self, config):
        self.config = np.asarray(config, np.uint8)
        self.tiles = np.zeros((8, 16, 64), np.uint8)
        self.configured = False
        self.start_row = 0

    def ldtilecfg(self):
        c = self.config
        palette, start = int(c[0]), int(c[1])
        colsb = c[16:48].copy().view("<u2").astype(int)
        rows = c[48:64].astype(int)
        if palette == 0:
            return self.tilerelease()
        if palette != 1 or start >= 16 or c[2:16].any():
            raise AmxFault("#GP")
        if rows[8:].any() or colsb[8:].any() or (rows > 16).any() or (colsb > 64).any():
            raise AmxFault("#GP")
        if ((rows == 0) != (colsb == 0)).any():
            raise AmxFault("#GP")
        self.rows, self.colsb, self.start_row = rows, colsb, start
        self.tiles[:] = 0
        self.configured = True

    def tilerelease(self):
        self.tiles[:] = 0
        self.configured = False

    def _check(self, *ts):
        if not self.configured or any(self.rows[t] == 0 for t in ts):
            raise AmxFault("#UD")

    def _check_whole_dwords(self, *ts):
        # Not in the SDM's pseudo-code, but what an AMX Xeon does (SIGILL): loads, stores and
        # TDPs of a tile whose colsb is not a multiple of 4 raise #UD; LDTILECFG and TILEZERO
        # accept it.
        if any(self.colsb[t] % 4 for t in ts):
            raise AmxFault("#UD")

    def tileloadd(self, t, mem, off, stride):
        self._check(t)
        self._check_whole_dwords(t)
        r, cb = self.rows[t], self.colsb[t]
        self.tiles[t, r:] = 0
        for i in range(self.start_row, r):
            a = off + i * stride
            self.tiles[t, i] = 0
            self.tiles[t, i, :cb] = mem[a : a + cb]
        self.start_row = 0

    def tilestored(self, t, mem, off, stride):
        self._check(t)
        self._check_whole_dwords(t)
        for i in range(self.start_row, self.rows[t]):
            a = off + i * stride
            mem[a : a + self.colsb[t]] = self.tiles[t, i, : self.colsb[t]]
        self.start_row = 0

    def tilezero(self, t):
        self._check(t)
        self.tiles[t] = 0
        self.start_row = 0

    def tdp(self, c, a, b, a_signed, b_signed):
        self._check(c, a, b)
        self._check_whole_dwords(c, a, b)
        R, CB = self.rows, self.colsb
        if len({c, a, b}) < 3 or CB[a] // 4 != R[b] or CB[c] != CB[b] or R[c] != R[a]:
            raise AmxFault("#UD")
        M, K, N = R[c], CB[a] // 4, CB[c] // 4
        at = self.tiles[a, :M, : 4 * K].view(np.int8 if a_signed else np.uint8)
        bt = self.tiles[b, :K, : 4 * N].view(np.int8 if b_signed else np.uint8)
        A = at.astype(np.int64).reshape(M, K, 4)
        B = bt.astype(np.int64).reshape(K, N, 4)
        old = self.tiles[c, :M, : 4 * N].copy().view("<i4").astype(np.int64)
        new = (old + np.einsum("mkj,knj->mn", A, B)) % 2**32  # dword sums wrap around
        row = self.tiles[c, :M].copy()  # bytes [4N, colsb) keep their old values
        row[:, : 4 * N] = new.astype("<u4").view(np.uint8).reshape(M, 4 * N)
        row[:, CB[c] :] = 0
        self.tiles[c, :M] = row
        self.tiles[c, M:] = 0
        self.start_row = 0

    def run(self, mem, program):
        mem = np.array(mem, np.uint8)
        for op_, t0, t1, t2, off, stride in np.asarray(program).reshape(-1, 6).tolist():
            if op_ == CFG:
                self.ldtilecfg()
            elif op_ == LOAD:
                self.tileloadd(t0, mem, off, stride)
            elif op_ == STORE:
                self.tilestored(t0, mem, off, stride)
            elif op_ == ZERO:
                self.tilezero(t0)
            elif op_ == RELEASE:
                self.tilerelease()
            else:
                self.tdp(t0, t1, t2, *DP_SIGNS[op_])
        return mem


def selftest(path, config, mem, program):
    """(buffer after the program, [8, 16, 64] tile storage or None) from the C++ side."""
    out, tiles = torch.ops.dsconv_ext._amx_tile_selftest(
        path, [int(v) for v in config], torch.from_numpy(np.asarray(mem, np.uint8)), program
    )
    return out.numpy(), (tiles.numpy() if tiles.numel() else None)


@pytest.fixture(params=AMX_ISAS)
def tile_path(request):
    if request.param == "amx":
        try:  # an empty program: says why where the machine has no usable tiles
            selftest("amx", make_config([], []), np.zeros(1, np.uint8), [])
        except RuntimeError as e:
            pytest.skip(str(e).splitlines()[0])
    return request.param


def check_program(path, config, mem, program, what):
    ref = TileRef(config)
    want = ref.run(mem, program)
    got, tiles = selftest(path, config, mem, program)
    assert np.array_equal(got, want), f"memory differs: {what}"
    if tiles is not None:  # the model shows its whole storage: the zeroing rules too
        assert np.array_equal(tiles, ref.tiles), f"tile storage differs: {what}"


def biased_bytes(rng, n):
    """Random bytes, a third of them the extremes 0x00, 0x7F, 0x80, 0xFF."""
    b = rng.integers(0, 256, n).astype(np.uint8)
    ext = rng.random(n) < 0.33
    b[ext] = rng.choice(np.array([0x00, 0x7F, 0x80, 0xFF], np.uint8), ext.sum())
    return b


def random_program(seed):
    """A configuration with matching TDP shapes (C: tmm0-1, A: tmm2-3, B: tmm4-5) plus two
    free tiles of any shape the loads and stores take (partial rows, any whole number of dwords
    per row), and a random instruction mix: loads with
    strides below, at and above colsb (rows overlapping, zero and negative strides too), TDPs of
    every signedness, zeroing, stores, sometimes a start_row."""
    rng = np.random.default_rng(seed)
    M, K, N = (int(v) for v in rng.integers(1, 17, 3))
    rows = [M, M, M, M, K, K] + [int(v) for v in rng.integers(1, 17, 2)]
    free = [4 * int(v) for v in rng.integers(1, 17, 2)]
    colsb = [4 * N, 4 * N, 4 * K, 4 * K, 4 * N, 4 * N] + free
    start = int(rng.integers(0, M)) if rng.random() < 0.2 else 0
    config = make_config(rows, colsb, start_row=start)
    size = 8192
    mem = biased_bytes(rng, size)
    prog = [[CFG, 0, 0, 0, 0, 0]]

    def mem_op(kind, t):
        stride = int(rng.choice([colsb[t], 64, 0, -64, int(rng.integers(1, 200))]))
        lo = max(0, -(rows[t] - 1) * stride)
        hi = size - colsb[t] - max(0, (rows[t] - 1) * stride)
        prog.append([kind, t, 0, 0, int(rng.integers(lo, hi)), stride])

    for t in range(8):
        mem_op(LOAD, t)
    for _ in range(int(rng.integers(5, 30))):
        r = rng.random()
        if r < 0.45:
            prog.append([int(rng.integers(DP_SS, DP_UU + 1)), rng.integers(0, 2),
                         2 + rng.integers(0, 2), 4 + rng.integers(0, 2), 0, 0])  # fmt: skip
        elif r < 0.75:
            mem_op(LOAD, int(rng.integers(0, 8)))
        elif r < 0.9:
            mem_op(STORE, int(rng.integers(0, 8)))
        else:
            prog.append([ZERO, int(rng.integers(0, 8)), 0, 0, 0, 0])
    for t in range(8):
        mem_op(STORE, t)
    return config, mem, [int(v) for row in prog for v in row]


def test_tile_programs_match_pseudo_code(tile_path):
    for seed in range(150):
        config, mem, prog = random_program(seed)
        check_program(tile_path, config, mem, prog, f"random_program({seed})")


def test_tileloadd_partial_rows_and_colsb(tile_path):
    """Partial tiles: only `rows` rows of `colsb` bytes come from memory (row r from
    base + r * stride), everything else of the 16 x 64 storage is zero, and a store writes only
    those bytes back."""
    rows, colsb = [3, 16, 1, 7, 16, 5, 2, 9], [20, 64, 4, 36, 4, 60, 64, 12]
    config = make_config(rows, colsb)
    mem = np.full(4096, 0xFF, np.uint8)
    mem[:2048] = np.arange(2048) % 251
    prog = [CFG, 0, 0, 0, 0, 0]
    for t in range(8):
        prog += [LOAD, t, 0, 0, 100 + 13 * t, 70 + t]
    for t in range(8):
        prog += [STORE, t, 0, 0, 2048 + 256 * t, 16]  # into the 0xFF half: untouched bytes stay
    check_program(tile_path, config, mem, prog, "partial tiles")
    ref = TileRef(config)
    ref.run(mem, prog)
    assert ref.tiles[0, 3:].max() == 0 and ref.tiles[0, :3, 20:].max() == 0
    assert ref.tiles[0, 2, :20].tolist() == [(100 + 2 * 70 + i) % 251 for i in range(20)]


def test_tilezero_takes_any_colsb(tile_path):
    """TILEZERO, unlike loads, stores and TDPs, runs on a tile whose rows are not whole dwords."""
    config = make_config([2, 16], [3, 64])
    mem = biased_bytes(np.random.default_rng(2), 2048)
    prog = [CFG, 0, 0, 0, 0, 0, LOAD, 1, 0, 0, 0, 64, ZERO, 0, 0, 0, 0, 0,
            STORE, 1, 0, 0, 1024, 64]  # fmt: skip
    check_program(tile_path, config, mem, prog, "TILEZERO, colsb 3")


def test_start_row_applies_to_one_instruction(tile_path):
    """LDTILECFG's start_row (a restarted load's resume point) skips the rows before it in the
    next load only; every instruction then resets it to 0."""
    config = make_config([16] * 8, [64] * 8, start_row=5)
    mem = biased_bytes(np.random.default_rng(1), 4096)
    prog = [CFG, 0, 0, 0, 0, 0, LOAD, 6, 0, 0, 0, 64, LOAD, 7, 0, 0, 1024, 64,
            STORE, 6, 0, 0, 2048, 64, STORE, 7, 0, 0, 3072, 64]  # fmt: skip
    check_program(tile_path, config, mem, prog, "start_row")
    ref = TileRef(config)
    ref.run(mem, prog)
    assert ref.tiles[6, :5].max() == 0
    assert np.array_equal(ref.tiles[6, 5:], mem[5 * 64 : 16 * 64].reshape(11, 64))


@pytest.mark.parametrize("kind", [DP_SS, DP_SU, DP_US, DP_UU])
def test_tdp_sign_extremes_and_wraparound(tile_path, kind):
    """A bytes all 0x80 (-128 signed, 128 unsigned) against B bytes all 0xFF (-1 / 255), 16 x 64
    products per dword, onto C dwords next to INT32_MIN / INT32_MAX: each signedness gives its
    own product and the sums wrap modulo 2^32 instead of saturating."""
    a_signed, b_signed = DP_SIGNS[kind]
    prod = 64 * (-128 if a_signed else 128) * (-1 if b_signed else 255)
    c0 = np.array([2**31 - 5, -(2**31) + 5, 0, -1] * 64, "<i4")
    mem = np.concatenate([c0.view(np.uint8), np.full(1024, 0x80, np.uint8),
                          np.full(1024, 0xFF, np.uint8), np.zeros(1024, np.uint8)])  # fmt: skip
    config = make_config([16] * 3, [64] * 3)
    prog = [CFG, 0, 0, 0, 0, 0, LOAD, 0, 0, 0, 0, 64, LOAD, 1, 0, 0, 1024, 64,
            LOAD, 2, 0, 0, 2048, 64, kind, 0, 1, 2, 0, 0, STORE, 0, 0, 0, 3072, 64]  # fmt: skip
    check_program(tile_path, config, mem, prog, f"TDP opcode {kind}")
    got, _ = selftest(tile_path, config, mem, prog)
    want = ((c0.astype(np.int64) + prod + 2**31) % 2**32 - 2**31).astype("<i4")
    assert np.array_equal(got[3072:].view("<i4"), want)


DP012 = [CFG, 0, 0, 0, 0, 0, DP_SU, 0, 1, 2, 0, 0]
DP002 = [CFG, 0, 0, 0, 0, 0, DP_SU, 0, 0, 2, 0, 0]


@pytest.mark.parametrize(
    "what,config,prog,fault",
    [
        ("palette 2", make_config([1], [4], palette=2), [CFG, 0, 0, 0, 0, 0], "#GP"),
        ("17 rows", make_config([17], [4]), [CFG, 0, 0, 0, 0, 0], "#GP"),
        ("65 colsb", make_config([1], [65]), [CFG, 0, 0, 0, 0, 0], "#GP"),
        ("rows without colsb", make_config([1], [0]), [CFG, 0, 0, 0, 0, 0], "#GP"),
        ("tile 8", make_config([0] * 8 + [1], [0] * 8 + [4]), [CFG, 0, 0, 0, 0, 0], "#GP"),
        ("no config", make_config([1], [4]), [ZERO, 0, 0, 0, 0, 0], "#UD"),
        ("empty tile", make_config([1], [4]), [CFG, 0, 0, 0, 0, 0, ZERO, 1, 0, 0, 0, 0], "#UD"),
        ("released", make_config([1], [4]), [CFG, 0, 0, 0, 0, 0, RELEASE, 0, 0, 0, 0, 0,
                                             ZERO, 0, 0, 0, 0, 0], "#UD"),  # fmt: skip
        ("K mismatch", make_config([2, 2, 3], [8, 8, 8]), DP012, "#UD"),
        ("N mismatch", make_config([2, 2, 2], [8, 8, 12]), DP012, "#UD"),
        ("M mismatch", make_config([2, 3, 2], [8, 8, 8]), DP012, "#UD"),
        ("same tile", make_config([2, 2, 2], [8, 8, 8]), DP002, "#UD"),
        ("load, colsb 3", make_config([2], [3]), [CFG, 0, 0, 0, 0, 0, LOAD, 0, 0, 0, 0, 4], "#UD"),
        ("store, colsb 6", make_config([2], [6]), [CFG, 0, 0, 0, 0, 0, STORE, 0, 0, 0, 0, 8],
         "#UD"),
        ("TDP, A colsb 5", make_config([1, 1, 1], [4, 5, 4]), DP012, "#UD"),
        ("TDP, B and C colsb 6", make_config([1, 1, 1], [6, 4, 6]), DP012, "#UD"),
    ],
)  # fmt: skip
def test_model_faults_where_the_hardware_would(what, config, prog, fault):
    """The model refuses what the SDM says faults, so a kernel bug that would crash an AMX
    machine fails the tests everywhere."""
    with pytest.raises(AmxFault, match=fault):
        TileRef(config).run(np.zeros(64, np.uint8), prog)
    with pytest.raises(RuntimeError, match=f"AMX model: {fault}"):
        selftest("amx_model", config, np.zeros(64, np.uint8), prog)


def test_selftest_checks_its_input():
    config = make_config([2], [8])
    mem = torch.zeros(64, dtype=torch.uint8)
    for args, msg in [
        (("amx_model", list(config), mem, [LOAD, 0, 0, 0, 60, 8]), "reaches bytes"),
        (("amx_model", list(config), mem, [LOAD, 0, 0, 0, 0, -8]), "reaches bytes"),
        (("amx_model", list(config), mem, [LOAD, 9, 0, 0, 0, 8]), "tile numbers"),
        (("amx_model", list(config), mem, [42, 0, 0, 0, 0, 0]), "opcode"),
        (("amx_model", list(config), mem, [LOAD, 0, 0]), "6 ints"),
        (("amx_model", list(config)[:10], mem, []), "64 bytes"),
        (("amx_model", list(config), mem.float(), []), "uint8"),
        (("avx", list(config), mem, []), "path must be"),
    ]:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.dsconv_ext._amx_tile_selftest(*args)


# --- Convolutions on the AMX path --------------------------------------------------------------


def amx_calls():
    return torch.ops.dsconv_ext._cpu_path_calls()[4]


def conv_case(seed, C, O, k, stride, N, HW, block, groups=1, exact=False, **opt):
    """A dense conv with padding k // 2. exact: integer activations with every block's max |x| in
    [64, 127] (E = 0 at 8 bits), weights spanning [-128, 127] with alpha = 1: the output is the
    sum of the per-(block, tap) integer sums."""
    g = torch.Generator().manual_seed(seed)
    Cg, H, W = C // groups, *HW
    x = torch.randn(N, C, H, W, generator=g) * opt.pop("scale", 1.0)
    w = torch.randn(O, Cg, k, k, generator=g)
    q, alpha, kdsb = quantize_weight(w, opt.pop("bits", 8), block, kds_bias=opt.pop("kdsb", False))
    case = dict(x=x, intweight=q, alpha=alpha, KDSb=kdsb, stride=(stride, stride),
                padding=(k // 2, k // 2), dilation=(1, 1), groups=groups, block_size=block,
                act_bits=opt.pop("act_bits", 8), fuse_silu=opt.pop("silu", False))  # fmt: skip
    if opt.pop("cds", False):
        case.update(CDSw=torch.rand(O, generator=g) + 0.5, CDSb=torch.randn(O, generator=g))
    if opt.pop("bias", False):
        case["bias"] = torch.randn(O, generator=g)
    assert not opt, opt
    if exact:
        xi = torch.randint(-127, 128, x.shape, generator=g).float()
        for grp in range(groups):
            for b0 in range(0, Cg, block):
                xi[:, grp * Cg + b0] = torch.randint(64, 128, xi[:, 0].shape, generator=g).float()
        qi = torch.randint(-128, 128, q.shape, generator=g, dtype=torch.int8)
        qi.view(-1)[::7] = -128
        qi.view(-1)[3::11] = 127
        case.update(x=xi, intweight=qi, alpha=torch.ones_like(alpha), KDSb=None, act_bits=8)
    return case


# Block sizes of the int8 family (>= 5 channels): partial k4 groups, one A tile (K4 <= 16),
# exactly 16 groups, and two or three A tiles with the last one overlapping the previous.
BLOCKS = [5, 6, 7, 8, 13, 16, 31, 32, 33, 48, 63, 64, 65, 100, 128, 129, 200]


@pytest.mark.parametrize("block", BLOCKS)
def test_integer_sums_exact(amx_isa, block):
    """Outputs that are integer sums must equal the reference exactly: 1x1 and 3x3, strides 1
    and 2, batch 1 and 8, output channels below, at and past multiples of 16, partial blocks."""
    seed = 0
    for k in (1, 3):
        for stride in (1, 2):
            for N in (1, 8):
                seed += 1
                # every partial sum below 2^24: exact in float32 whatever the order
                C = min(2 * block + 3, 1000 // (k * k))
                O = [5, 16, 21, 40][seed % 4]
                HW = (7, 9) if N == 8 else (11, 13)
                case = conv_case(seed, C, O, k, stride, N, HW, block, exact=True)
                before = amx_calls()
                y, ref = op(case), dsconv2d_reference(**case)
                assert amx_calls() == before + 1, "the int8 call did not run the AMX kernel"
                assert torch.equal(y, ref), f"block {block} seed {seed}: {describe(case)}"


@pytest.mark.parametrize("block", [13, 64, 65, 100])
def test_each_block_tap_sum_exact(amx_isa, block):
    """alpha one-hot on one (block, tap): the output is that segment's integer sum alone, for
    every segment, blocks of one A tile and of several overlapping ones."""
    case = conv_case(block, 2 * block + 7, 19, 3, 1, 2, (6, 7), block, exact=True)
    _, sums = dsconv2d_reference(**case, return_int_sums=True)  # [N, O, nblk, taps, Ho, Wo]
    O, nblk, kh, kw = case["alpha"].shape
    for b in range(nblk):
        for t in range(kh * kw):
            alpha = torch.zeros(O, nblk, kh, kw)
            alpha[:, b, t // kw, t % kw] = 1.0
            y = op(dict(case, alpha=alpha))
            assert torch.equal(y, sums[:, :, b, t].float()), f"block {block}: segment ({b}, {t})"


def amx_random_case(seed):
    """A random dense int8 conv of the shapes the AMX kernel tiles: block sizes 5..200 with
    partial blocks, 1x1 / 3x3 (sometimes 5x5 or a dilated 2x2), strides 1-2, batch 1 or 8,
    groups, output channels around multiples of 16, every epilogue option, scales down to
    subnormal blocks, NaN / Inf activations, zero and subnormal alphas."""
    g = torch.Generator().manual_seed(50_000 + seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    block = BLOCKS[ri(0, len(BLOCKS) - 1)]
    groups = [1, 1, 1, 2][ri(0, 3)]
    Cg = max(5, min(ri(block // 2, 2 * block + 5), 260))
    O = groups * [1, 7, 16, 17, 24, 32, 33][ri(0, 6)]
    k = [1, 1, 3, 3, 5, 2][ri(0, 5)]
    N = [1, 1, 8][ri(0, 2)]
    HW = (ri(2, 12), ri(1, 12)) if N == 8 else (ri(2, 24), ri(1, 24))
    case = conv_case(seed, Cg * groups, O, k, ri(1, 2), N, HW, block, groups,
                     scale=[1.0, 1.0, 1e-3, 1e3, 1e-39, 1e30][ri(0, 5)], bits=ri(2, 8),
                     act_bits=ri(2, 8), kdsb=ri(0, 1) == 1, cds=ri(0, 1) == 1,
                     bias=ri(0, 1) == 1, silu=ri(0, 1) == 1)  # fmt: skip
    if k == 2:
        case.update(padding=(0, 1), dilation=(1, 2))
    x = case["x"]
    if ri(0, 4) == 0:  # NaN / Inf: exactly the outputs reading the block are NaN
        for _ in range(ri(1, 3)):
            idx = tuple(ri(0, s - 1) for s in x.shape)
            x[idx] = [math.nan, math.inf, -math.inf][ri(0, 2)]
    if ri(0, 4) == 0:
        alpha = case["alpha"].clone()
        alpha.view(-1)[:: ri(2, 9)] = 0.0
        alpha.view(-1)[1 :: ri(3, 9)] = 1e-40  # subnormal: the vscalefps fold
        case["alpha"] = alpha
    return case


@pytest.mark.parametrize("chunk", range(3))
def test_random_problems_match_reference(amx_isa, chunk, threads):
    for seed in range(chunk * 30, (chunk + 1) * 30):
        torch.set_num_threads(1 + seed % 2)
        case = amx_random_case(seed)
        before = amx_calls()
        y = op(case)
        assert amx_calls() == before + 1, f"amx_random_case({seed}) did not run the AMX kernel"
        assert_close(y, dsconv2d_reference(**case), f"amx_random_case({seed}) {describe(case)}")


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_bit_identical_to_avx512(amx_isa, monkeypatch):
    """The AMX kernel folds each (block, tap) segment with the AVX-512 kernel's instructions in
    the AVX-512 kernel's order: the outputs are the same bits (NaN payloads included)."""
    cases = [("amx_random_case", i, amx_random_case(i)) for i in range(40)]
    cases += [("random_case", i, random_case(i)) for i in range(40)]
    cases += [("wide_case", i, wide_case(i)) for i in range(40)]
    for kind, seed, case in cases:
        monkeypatch.setenv("DSCONV_EXT_CPU_ISA", amx_isa)
        y = op(case)
        use_isa(monkeypatch, "avx512_vnni")
        assert same_bits(y, op(case)), f"{kind}({seed}) {describe(case)}"


@pytest.mark.parametrize("N", [1, 8])
def test_yolo_1x1_shapes(amx_isa, N, monkeypatch):
    """The 1x1 layers of the YOLO11 models (a large share of their int8 work) take the AMX path
    at batch 1 and 8, with pixel counts that are not multiples of 16 and output channels that
    are not multiples of 16 (the Detect head's cls branch of a one-class model)."""
    shapes = [(32, 32, 20, 20), (64, 64, 10, 10), (128, 64, 5, 5), (96, 1, 7, 7), (48, 40, 9, 9),
              (256, 256, 5, 5), (80, 24, 3, 4)]  # fmt: skip
    for i, (C, O, H, W) in enumerate(shapes):
        case = conv_case(i, C, O, 1, 1, N, (H, W), 32, kdsb=True, cds=True, silu=True)
        before = amx_calls()
        y = op(case)
        assert amx_calls() == before + 1, f"1x1 {C}->{O} {H}x{W} did not run the AMX kernel"
        assert_close(y, dsconv2d_reference(**case), describe(case))
        monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "avx512_vnni")
        if torch.ops.dsconv_ext.cpu_isa() == "avx512_vnni":
            assert same_bits(y, op(case)), describe(case)
        monkeypatch.setenv("DSCONV_EXT_CPU_ISA", amx_isa)


@pytest.mark.parametrize("N", [1, 8])
def test_out_writes_into_a_channel_slice(amx_isa, N):
    """dsconv2d_out from the AMX kernel stores exactly dsconv2d's result into a channel slice
    (batch 8: image strides of the larger buffer), the guard channels untouched."""
    for seed, (k, O) in enumerate([(1, 16), (3, 21), (1, 40), (3, 32)]):
        case = conv_case(seed, 40, O, k, 1 + seed % 2, N, (9, 11), 16, kdsb=True, bias=True)
        want = op(case)
        buf = torch.full((N, O + 5, *want.shape[2:]), 7.0)
        slot = buf[:, 3 : 3 + O]
        args = [case.get(n) for n in ("x", "intweight", "alpha", "KDSb", "CDSw", "CDSb", "bias")]
        torch.ops.dsconv_ext.dsconv2d_out(
            *args, list(case["stride"]), list(case["padding"]), list(case["dilation"]),
            case["groups"], case["block_size"], case["act_bits"], case["fuse_silu"], slot,
        )  # fmt: skip
        assert same_bits(slot, want), f"seed {seed}: {describe(case)}"
        assert (buf[:, :3] == 7).all() and (buf[:, 3 + O :] == 7).all(), f"seed {seed}"


def test_threads_give_identical_results(amx_isa, threads):
    """The band / output-chunk split (16-channel o-tiles on AMX) changes with the thread count;
    the arithmetic of each output does not."""
    for seed in range(20):
        case = amx_random_case(seed)
        torch.set_num_threads(1)
        y1 = op(case)
        torch.set_num_threads(2)
        assert same_bits(y1, op(case)), f"amx_random_case({seed})"


def test_depthwise_and_float_layers_keep_their_paths(amx_isa):
    """Under amx only the int8 family moves to the tiles: depthwise and small-block layers keep
    the AVX-512 paths."""
    before = torch.ops.dsconv_ext._cpu_path_calls()
    dw = conv_case(1, 16, 16, 3, 1, 1, (9, 9), 32, groups=16)
    stem = conv_case(2, 3, 16, 3, 2, 1, (9, 9), 32)
    for case in (dw, stem):
        assert_close(op(case), dsconv2d_reference(**case), describe(case))
    after = torch.ops.dsconv_ext._cpu_path_calls()
    assert after[2] == before[2] + 1 and after[1] == before[1] + 1 and after[4] == before[4]


def test_isa_selection(monkeypatch):
    """By default the kernel takes amx where the CPU and OS run it, never the model; forcing amx
    elsewhere is an error that names the variable and the reason."""
    monkeypatch.delenv("DSCONV_EXT_CPU_ISA", raising=False)
    default = torch.ops.dsconv_ext.cpu_isa()
    assert default != "amx_model"
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "amx")
    if default == "amx":
        assert torch.ops.dsconv_ext.cpu_isa() == "amx"
    else:
        with pytest.raises(RuntimeError, match="DSCONV_EXT_CPU_ISA=amx, but this machine"):
            torch.ops.dsconv_ext.cpu_isa()
        with pytest.raises(RuntimeError, match="DSCONV_EXT_CPU_ISA=amx"):
            op(conv_case(0, 8, 8, 1, 1, 1, (4, 4), 8))
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "avx512_vnni")  # lowering from amx still works
    assert torch.ops.dsconv_ext.cpu_isa() in ("avx512_vnni", "avx2", "scalar")


@pytest.mark.parametrize(
    "C,k,block,amx",
    [(16, 3, 32, False), (24, 1, 8, False), (31, 3, 64, False), (32, 3, 32, True),
     (32, 1, 128, True), (64, 1, 32, True), (256, 3, 32, True)],
)  # fmt: skip
def test_default_path_takes_amx_where_it_pays_off(monkeypatch, C, k, block, amx):
    """Left to itself on an AMX machine, the kernel runs an int8 layer on the tiles only where
    they beat the VNNI tiles (amx_pays_off in dsconv2d_cpu.cpp: from 32 input channels per
    group on); DSCONV_EXT_CPU_ISA=amx forces them, and both give the same bits."""
    monkeypatch.delenv("DSCONV_EXT_CPU_ISA", raising=False)
    if torch.ops.dsconv_ext.cpu_isa() != "amx":
        pytest.skip("the default path is not amx on this machine")
    case = conv_case(C + k + block, C, 24, k, 1, 1, (9, 10), block, kdsb=True, silu=True)
    before = amx_calls()
    y = op(case)
    assert amx_calls() == before + int(amx), f"C={C} k={k} block={block}"
    assert_close(y, dsconv2d_reference(**case), describe(case))
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "amx")
    before = amx_calls()
    assert same_bits(y, op(case)) and amx_calls() == before + 1


def test_info_reports_the_amx_layer_rule(monkeypatch):
    """`info` says which int8 layers take the tiles when the kernel chose AMX by itself, and
    nothing of the kind when DSCONV_EXT_CPU_ISA=amx forces them (or the path is not AMX)."""
    monkeypatch.delenv("DSCONV_EXT_CPU_ISA", raising=False)
    entry = dsconv_ext.dsconv_backend_report()["cpu"]
    if entry.get("isa") == "amx":
        assert entry["amx_layers"].startswith(">= 32 input channels per group"), entry
        monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "amx")
        assert "amx_layers" not in dsconv_ext.dsconv_backend_report()["cpu"]
    else:
        assert "amx_layers" not in entry, entry
