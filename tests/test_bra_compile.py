"""BRA Triton launch configurations against real compiler reports, without a GPU.

The resource model (``dsconv_ext.bra.launch_config``) is held against what ``triton.compile`` for
GPUTarget sm_80 / sm_86 / sm_89 / sm_90 and Triton's ``ptxas -v`` report; the runtime guard's
decision is tested with faked device properties; the CLI's exit status with a planted bad config.
"""

from __future__ import annotations

import os
import types
import warnings

import pytest
import torch

from dsconv_ext.bra import backend, launch_config
from dsconv_ext.bra.launch_config import ARCH_SHARED_LIMIT, KERNELS, REG_BUDGET, choose

if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("compiling for GPU targets needs TRITON_INTERPRET unset", allow_module_level=True)

cc = pytest.importorskip("dsconv_ext.bra.compile_check")


def _row(arch, kernel, dtype, d, wq, wk=None):
    dt, prec = cc._split_dtype(dtype)
    cfg = choose(kernel, dtype=dt, dk=d, dv=d, wq=wq, wk=wk or wq, precision=prec, arch=arch)
    assert cfg is not None, (arch, kernel, dtype, d, wq)
    row = cc.Row(arch, kernel, dtype, d, d, str(wq), str(wk or wq), cfg.block_m, cfg.block_n,
                 cfg.num_warps, cfg.num_stages, limit=ARCH_SHARED_LIMIT[arch],
                 pred_shared=cfg.shared, pred_regs=cfg.regs, chunks=cfg.chunks)  # fmt: skip
    return cc.compile_config(row)


# The issue's failing cases and a spread of kernels / dtypes / archs: fp32 C=768 (head dim 96)
# with 361-pixel windows on sm_86, head dim 192 (x scale) on sm_80 and sm_90, fp16 / bf16.
SAMPLE = [
    (86, "fwd", "fp32-tf32", 96, 361),
    (86, "fwd", "fp32-ieee", 96, 361),
    (86, "bwd_dq", "fp32-tf32", 96, 361),
    (86, "bwd_dkdv", "fp32-tf32", 96, 361),
    (89, "bwd_dkdv", "fp16", 96, 144),
    (80, "fwd", "fp32-tf32", 96, 144),
    (80, "bwd_dkdv", "bf16", 192, 529),
    (90, "fwd", "fp16", 96, 361),
    (90, "bwd_dq", "bf16", 192, 144),
    (90, "fwd", "fp32-ieee", 128, 36),
    (80, "bwd_preprocess", "fp32-tf32", 128, 361),
    (86, "fwd", "fp16", 24, 4),
    # head dim 192 in fp32: chunked head dims (3 x 64), exact and TF32, 99 KB and 227 KB parts
    (86, "fwd", "fp32-ieee", 192, 361),
    (89, "bwd_dq", "fp32-ieee", 192, 144),
    (86, "bwd_dkdv", "fp32-ieee", 192, 36),
    (89, "bwd_dkdv", "fp32-tf32", 192, 361),
    (90, "bwd_dkdv", "fp32-tf32", 192, 144),
    (80, "fwd", "fp32-ieee", 192, 36),
]


@pytest.mark.parametrize("case", SAMPLE, ids=["-".join(map(str, c)) for c in SAMPLE])
def test_chosen_config_compiles_within_limits_and_model_bounds_shared(case):
    row = _row(*case)
    assert row.status.startswith("ok"), (row.status, row.detail, row)
    assert row.shared <= row.limit
    assert row.spill <= launch_config.SPILL_ALLOWANCE
    # The model is an upper bound of Triton's allocation, and not a wildly loose one.
    assert row.shared <= row.pred_shared, (row.shared, row.pred_shared)
    assert row.pred_shared <= 2.5 * row.shared + 4096, (row.shared, row.pred_shared)


def test_old_fixed_choice_fails_where_the_issue_says():
    """The tiles _meta used before (64x64, 8 warps, 2 stages) for fp32 head dim 96 on sm_86: the
    check must flag them (this is what the compile check exists to catch)."""
    row = cc.Row(86, "fwd", "fp32-tf32", 96, 96, "361", "361", 64, 64, 8, 2,
                 limit=ARCH_SHARED_LIMIT[86])  # fmt: skip
    cc.compile_config(row)
    assert row.status == "OVERFLOW" and row.shared > 99 * 1024, row
    row = cc.Row(80, "fwd", "fp32-ieee", 96, 96, "361", "361", 64, 64, 8, 2,
                 limit=ARCH_SHARED_LIMIT[80])  # fmt: skip
    cc.compile_config(row)
    assert row.status == "SPILL" and row.spill > 10000, row


def test_every_problem_of_the_grid_gets_a_config_within_the_model_limits():
    problems = cc.yolo_problems() + cc.generic_problems()
    for arch in cc.DEFAULT_ARCHS:
        for pb in problems:
            dt, prec = cc._split_dtype(pb.dtype)
            for k in KERNELS:
                cfg = choose(k, dtype=dt, dk=pb.dk, dv=pb.dv, wq=pb.wq, wk=pb.wk,
                             precision=prec, arch=arch)  # fmt: skip
                # every problem gets a Triton config: no torch fallback
                assert cfg is not None, (arch, k, pb)
                # chunked head dims only where no unchunked candidate fits
                whole = choose(k, dtype=dt, dk=pb.dk, dv=pb.dv, wq=pb.wq, wk=pb.wk,
                               precision=prec, arch=arch, chunks=1)  # fmt: skip
                assert (cfg.chunks > 1) == (whole is None), (arch, k, pb, cfg)
                if cfg.chunks == 1:
                    assert cfg == whole
                assert cfg.shared + launch_config.SHARED_MARGIN <= ARCH_SHARED_LIMIT[arch]
                assert cfg.regs <= max(
                    REG_BUDGET[cfg.num_warps],
                    launch_config.LAST_RESORT_BUDGET.get(cfg.num_warps, 0),
                )
                assert cfg.block_m >= 16 and cfg.block_n >= 16


def test_chunk_widths_and_the_choice_for_head_dim_192():
    assert launch_config.chunk_widths(192, 192, 1) == (256, 256)
    assert launch_config.chunk_widths(192, 192, 3) == (64, 64)
    assert launch_config.chunk_widths(160, 96, 3) == (64, 32)
    assert launch_config.chunk_widths(24, 24, 4) == (16, 16)  # tl.dot's minimum width
    for arch in (80, 86, 89, 90):
        cfg = choose("fwd", dtype="fp32", dk=192, dv=192, wq=361, wk=361, precision="ieee",
                     arch=arch)  # fmt: skip
        assert (cfg.chunks, cfg.block_dk, cfg.block_dv, cfg.num_stages) == (3, 64, 64, 2)
    # what fits unchunked stays unchunked (fp16 at 192; fp32 at 128)
    assert choose("bwd_dkdv", dtype="fp16", dk=192, dv=192, wq=361, wk=361, arch=86).chunks == 1
    fp32 = choose("fwd", dtype="fp32", dk=128, dv=128, wq=361, wk=361, precision="ieee", arch=86)
    assert fp32.chunks == 1
    # bwd_preprocess has no dot and never chunks
    pre = choose("bwd_preprocess", dtype="fp32", dk=192, dv=192, wq=361, wk=361, chunks=3)
    assert pre.chunks == 1 and pre.block_dv == 256


def test_stages_only_when_the_inner_loop_iterates():
    one = choose("fwd", dtype="fp16", dk=32, dv=32, wq=36, wk=16, arch=86)
    many = choose("fwd", dtype="fp16", dk=32, dv=32, wq=361, wk=361, arch=86)
    assert one.num_stages == 1 and many.num_stages == 2


def test_yolo_shapes_match_the_configs():
    """The channel table the grid uses equals what the BiFormer YAMLs build."""
    pytest.importorskip("ultralytics")
    import copy

    import yaml
    from ultralytics.nn.tasks import DetectionModel

    import dsconv_ext.yolo  # noqa: F401  (registers the modules)
    from dsconv_ext.bra import BiLevelRoutingAttention

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = yaml.safe_load(open(os.path.join(root, "configs", "yolo11-BiFormer.yaml")))
    for scale, chans in cc.YOLO_CHANNELS.items():
        d = copy.deepcopy(cfg)
        d["scale"] = scale
        m = DetectionModel(d, verbose=False)
        bra = [x for x in m.modules() if isinstance(x, BiLevelRoutingAttention)]
        assert tuple(x.dim for x in bra) == chans, scale
        assert {(x.num_heads, x.n_win) for x in bra} == {(cc.YOLO_HEADS, cc.YOLO_NWIN)}


# ----------------------------------------------------------------------------- runtime guard


def _props(major, minor, smem, regs=65536, threads=1024, name="fake"):
    return types.SimpleNamespace(major=major, minor=minor, shared_memory_per_block_optin=smem,
                                 regs_per_multiprocessor=regs, max_threads_per_block=threads,
                                 warp_size=32, name=name)  # fmt: skip


def test_guard_decision_with_faked_devices():
    rtx3090 = _props(8, 6, 99 * 1024)
    ok, why = backend.triton_fits(rtx3090, dtype=torch.float32, dk=96, dv=96, wq=361, wk=361,
                                  backward=True, allow_tf32=False)  # fmt: skip
    assert ok, why
    # x scale, fp32 training (head dim 192) on a 99 KB card: forward and backward fit, exact and
    # TF32 (chunked head dims).
    for allow_tf32 in (False, True):
        ok, why = backend.triton_fits(rtx3090, dtype=torch.float32, dk=192, dv=192, wq=361,
                                      wk=361, backward=True, allow_tf32=allow_tf32)  # fmt: skip
        assert ok, why
    # below the smallest chunked tiles' shared memory (fp16 head dim 64: 16-wide chunks, 6 KB)
    tiny = _props(8, 0, 4 * 1024)
    ok, why = backend.triton_fits(tiny, dtype=torch.float16, dk=64, dv=64, wq=144, wk=144,
                                  backward=False)  # fmt: skip
    assert not ok and "fwd" in why
    few_regs = _props(8, 0, 163 * 1024, regs=8192)
    ok, why = backend.triton_fits(few_regs, dtype=torch.float16, dk=64, dv=64, wq=144, wk=144,
                                  backward=False)  # fmt: skip
    assert not ok and "registers" in why


def test_guard_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: _props(8, 0, 4 * 1024))
    backend._WARNED.clear()

    def fake(shape):  # only what the guard reads of a CUDA tensor
        return types.SimpleNamespace(is_cuda=True, shape=shape, dtype=torch.float16,
                                     requires_grad=False, device="cuda:0")  # fmt: skip

    q, kv = fake((2, 49, 144, 8 * 64)), fake((2, 49, 144, 16 * 64))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert backend._triton_guard(q, kv, None, 8) is False
        assert backend._triton_guard(q, kv, None, 8) is False
    msgs = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "torch backend" in msgs[0]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: _props(8, 0, 163 * 1024))  # fmt: skip
    assert backend._triton_guard(q, kv, None, 8) is True


# ----------------------------------------------------------------------------- version gates


def test_version_gate_reports_old_torch(monkeypatch):
    monkeypatch.setattr(backend, "_KERNELS_STATUS", None)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    why = backend.triton_kernels_status()
    assert "2.5.1" in why and "2.6" in why
    assert backend.triton_status(torch.device("cuda")) == why
    monkeypatch.setattr(backend, "_KERNELS_STATUS", None)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    assert backend.triton_kernels_status() == "ok"
    assert "usable" in backend.bra_backend_report()["triton_kernels"]


# ----------------------------------------------------------------------------- CLI + cuobjdump


def test_cli_table_exit_status_and_cache(monkeypatch, tmp_path, capsys):
    one = [cc.Problem("fp16", 32, 32, 36, 36)]
    monkeypatch.setattr(cc, "representative", lambda problems: one)
    monkeypatch.setattr(cc, "default_cache_dir", lambda: str(tmp_path))
    from dsconv_ext.selfcheck import main

    assert main(["--compile-only", "--arch", "86", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "sm_86" in out and "bwd_dkdv" in out and " 0 failed" in out
    assert (tmp_path / "bra_compile_check.json").is_file()

    # Planted bug: the model hands out the old 64x64 / 8 warps / 2 stages for fp32 head dim 96.
    real = launch_config.choose

    def bad(kernel, **kw):
        cfg = real(kernel, **kw)
        if kernel == "fwd" and cfg is not None:
            cfg = launch_config.LaunchConfig("fwd", 64, 64, 128, 128, 8, 2, 0, 0)
        return cfg

    monkeypatch.setattr(cc, "choose", bad)
    monkeypatch.setattr(cc, "representative",
                        lambda problems: [cc.Problem("fp32-tf32", 96, 96, 361, 361)])  # fmt: skip
    assert main(["--compile-only", "--arch", "86"]) == 1
    assert "OVERFLOW" in capsys.readouterr().out


RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z3fooPf:
  REG:199 STACK:0 SHARED:43008 LOCAL:0 CONSTANT[0]:712 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _Z3fooPf:
  REG:168 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:712 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_cuobjdump_rows():
    from dsconv_ext.dsconv.cuda_resources import library_resources, parse_res_usage

    rows = parse_res_usage(RES_USAGE)
    assert [(r.arch, r.regs, r.stack, r.shared, r.local) for r in rows] == [
        ("sm_80", 199, 0, 43008, 0),
        ("sm_90", 168, 16, 0, 8),
    ]
    assert rows[0].kernel == "foo(float*)"
    cpu_lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    rows, note = library_resources(cpu_lib)
    assert rows == [] and "no CUDA code" in note
    from dsconv_ext._loader import load_library

    status = load_library()
    if status.loaded and status.path and status.path.endswith(".so"):
        rows, note = library_resources(status.path)
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("dsconv_ext::dsconv2d", "CUDA")
        assert bool(rows) == has_cuda, note
