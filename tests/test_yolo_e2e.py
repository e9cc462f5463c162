"""End to end on CPU and offline, for each task kind the configs cover: train, validate, predict,
save, reload in fresh processes (also with ULTRALYTICS_SAFE_LOAD=1), fuse, and ONNX export run by
onnxruntime. Plus the ``yolo`` command line on a DSConv config without importing dsconv_ext."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from yolo_helpers import (
    CONFIGS,
    IMGSZ,
    images,
    make_dataset,
    pth_site,
    rel_err,
    run_python,
    subprocess_env,
    train_args,
)

pytestmark = pytest.mark.slow  # minutes in all; CI runs them

TASKS = {
    "detect": "yolo11n-C3k2-DSConv-BiFormer.yaml",  # both add-ons in one model
    "segment": "yolo11n-BiFormer-seg.yaml",
    "obb": "yolo11n-BiFormer-obb.yaml",
}


@pytest.fixture(scope="module", autouse=True)
def setup():
    import dsconv_ext.yolo as dy

    dy.register()  # (conftest put a font in the private config dir: check_font stays offline)


def _raw(model, x):
    """First output tensor(s) of an ultralytics model in eval mode, as numpy."""
    with torch.no_grad():
        out = model(x)
    first = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(first, (tuple, list)):  # segment: (boxes+coefs, protos)
        return [t.numpy() for t in first]
    return [first.numpy()]


RELOAD = """
    import sys, site, numpy as np, torch
    if {site!r}:
        site.addsitedir({site!r})
    assert "dsconv_ext" not in sys.modules
    from ultralytics import YOLO
    yolo = YOLO({best!r})
    model = yolo.model.float().eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.load({x!r})))
    first = out[0] if isinstance(out, (tuple, list)) else out
    first = first if isinstance(first, (tuple, list)) else [first]
    np.savez({out!r}, *[t.numpy() for t in first])
    results = yolo.predict({images!r}, imgsz={imgsz}, verbose=False)
    import dsconv_ext.yolo as dy
    print("PREDICTED", len(results), "REGISTERED", dy.is_registered())
"""


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_val_predict_reload_fuse_export(task, tmp_path):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint

    from dsconv_ext import DSConv, DSConv2d

    data = make_dataset(tmp_path / "data", task)
    cfg = TASKS[task]

    # train (1 epoch) -> validate -> predict -> saved checkpoint
    yolo = YOLO(str(CONFIGS / cfg), task=task)
    yolo.train(data=str(data), **train_args(tmp_path, task))
    best = Path(yolo.trainer.best)
    assert best.is_file()
    metrics = YOLO(str(best)).val(
        data=str(data), imgsz=IMGSZ, batch=4, workers=0, plots=False, verbose=False
    )
    assert np.isfinite(metrics.box.map50)
    results = YOLO(str(best)).predict(images(data), imgsz=IMGSZ, verbose=False)
    assert len(results) == len(images(data))
    assert (results[0].obb if task == "obb" else results[0].boxes) is not None

    # reload in fresh processes: the model computes the same numbers there
    model, _ = load_checkpoint(str(best))
    model.eval()
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    np.save(tmp_path / "x.npy", x.numpy())
    want = _raw(model, x)
    imgs = images(data)[:2]
    for name, site, env in (
        ("plain", "", {}),  # unpickling imports dsconv_ext, which registers
        ("safe", str(pth_site(tmp_path)), {"ULTRALYTICS_SAFE_LOAD": "1"}),  # weights_only load
    ):
        out = tmp_path / f"out_{name}.npz"
        code = RELOAD.format(
            site=site, best=str(best), x=str(tmp_path / "x.npy"), out=str(out), images=imgs,
            imgsz=IMGSZ,
        )  # fmt: skip
        r = run_python(code, timeout=240, **env)
        assert "PREDICTED 2 REGISTERED True" in r.stdout, (name, r.stdout[-2000:])
        got = np.load(out)
        for i, w in enumerate(want):
            assert rel_err(got[f"arr_{i}"], w) < 1e-6, name

    # fuse: BN folds into DSConv's channel shift, the VQK is the one QAT trained (no
    # re-quantisation), outputs unchanged
    dsconvs = [m for m in model.modules() if isinstance(m, DSConv)]
    expected_q = {}
    if task == "detect":
        from dsconv_ext.dsconv.quant_primitives import quantize_weight

        assert dsconvs
        for m in dsconvs:
            expected_q[m] = quantize_weight(m.conv.weight, m.conv.bits, m.conv.block_size)[0]
    model.fuse(verbose=False)
    for m in dsconvs:
        assert not hasattr(m, "bn") and m.conv.frozen
        assert torch.equal(m.conv.intweight, expected_q[m])
    fused = _raw(model, x)
    for f, w in zip(fused, want):
        assert rel_err(f, w) < 1e-4
    info = model.info(verbose=True, imgsz=IMGSZ)
    assert info[-1] > 0  # GFLOPs counted, our layers included

    # ONNX export through ultralytics, run by onnxruntime
    ort = pytest.importorskip("onnxruntime")
    onnx_file = YOLO(str(best)).export(format="onnx", imgsz=IMGSZ, simplify=False)
    sess = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x1 = x[:1]
    outs = sess.run(None, {sess.get_inputs()[0].name: x1.numpy()})
    ref = _raw(model, x1)
    for o, w in zip(outs, ref):  # relative to the output's scale (protos of an untrained model
        assert o.shape == w.shape  # are ~1e-3, where float32 noise alone is ~1e-5 relative)
        assert np.abs(o - w).max() <= 1e-4 * (np.abs(w).max() + 1)
    assert any(isinstance(m, DSConv2d) for m in model.modules()) == (task == "detect")


def test_yolo_command_line_without_import(tmp_path):
    """`yolo detect train model=configs/yolo11n-C3k2-DSConv.yaml ...` in a process that never
    imports dsconv_ext: the installed start-up hook registers it (simulated with site.addsitedir
    on the .pth when the package was not installed with it)."""
    from dsconv_ext.yolo.__main__ import installed_hooks

    data = make_dataset(tmp_path / "data", "detect")
    args = {**train_args(tmp_path, "cli"), "model": str(CONFIGS / "yolo11n-C3k2-DSConv.yaml")}
    argv = ["detect", "train", f"data={data}", *(f"{k}={v}" for k, v in args.items())]
    yolo = shutil.which("yolo", path=os.path.dirname(sys.executable))
    if installed_hooks() and yolo:
        r = subprocess.run(
            [yolo, *argv], capture_output=True, text=True, timeout=400, env=subprocess_env()
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    else:
        run_python(
            f"""
            import site, sys
            site.addsitedir({str(pth_site(tmp_path))!r})
            sys.argv = ["yolo", *{argv!r}]
            from ultralytics.cfg import entrypoint
            entrypoint()
            assert "dsconv_ext.yolo.blocks" in sys.modules
            """,
            timeout=400,
        )
    best = tmp_path / "runs" / "cli" / "weights" / "best.pt"
    assert best.is_file()
    ckpt = torch.load(best, weights_only=False)
    layers = [type(m).__name__ for m in (ckpt.get("ema") or ckpt["model"]).modules()]
    assert layers.count("C3k2_DSConv") == 8 and "DSConv2d" in layers
