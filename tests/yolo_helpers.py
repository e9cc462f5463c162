"""Shared pieces of the YOLO integration tests: offline ultralytics, synthetic data, subprocesses.

Everything runs offline: ``YOLO_OFFLINE=1``, a local TTF stands in for ultralytics' Arial
download (tests/conftest.py puts it in the private ``YOLO_CONFIG_DIR``), and datasets are drawn
here (coloured rectangles; boxes, polygons or rotated boxes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
IMGSZ = 64
OLD_ULTRALYTICS = os.environ.get("DSCONV_EXT_OLD_ULTRALYTICS", "/tmp/ul830")

ultralytics = pytest.importorskip("ultralytics")


def pkg_parent() -> str:
    """Directory holding the dsconv_ext these tests import (installed or the checkout)."""
    import dsconv_ext

    return str(Path(dsconv_ext.__file__).resolve().parents[1])


def subprocess_env(**extra) -> dict:
    """Environment for a fresh Python: finds our dsconv_ext, offline, and the private
    YOLO_CONFIG_DIR that tests/conftest.py set up (never the user's real one)."""
    env = dict(os.environ)
    assert env.get("YOLO_CONFIG_DIR"), "tests/conftest.py sets a private YOLO_CONFIG_DIR"
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_parent(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env.update(YOLO_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code: str, timeout: float = 300, cwd=None, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; fail the test with its output if it fails."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=subprocess_env(**env),
    )
    if r.returncode != 0:
        pytest.fail(f"subprocess failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def pth_site(tmp: Path) -> Path:
    """A site directory holding only our .pth file: ``site.addsitedir`` on it is what an install
    does at start-up (tests use it when the package is not installed with the hook)."""
    d = tmp / "site"
    d.mkdir(parents=True, exist_ok=True)
    name = "dsconv_ext_yolo.pth"
    src = Path(pkg_parent()) / "dsconv_ext" / "yolo" / name
    if not src.is_file():  # an install without the package data: the checkout's copy is the same
        src = ROOT / "dsconv_ext" / "yolo" / name
    shutil.copyfile(src, d / name)
    return d


def _draw_objects(rng, img, task: str):
    """Draw 1-3 objects; return YOLO label lines for ``task``."""
    import cv2

    h, w = img.shape[:2]
    lines = []
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(0, 2))
        color = (0, 0, 255) if cls == 0 else (255, 128, 0)
        bw, bh = rng.integers(w // 5, w // 2), rng.integers(h // 5, h // 2)
        cx, cy = (
            rng.integers(bw // 2 + 1, w - bw // 2 - 1),
            rng.integers(bh // 2 + 1, h - bh // 2 - 1),
        )
        angle = float(rng.uniform(-40, 40)) if task == "obb" else 0.0
        pts = cv2.boxPoints(((float(cx), float(cy)), (float(bw), float(bh)), angle))
        pts = np.clip(pts, 0, [w - 1, h - 1])
        cv2.fillPoly(img, [pts.astype(np.int32)], color)
        norm = (pts / [w, h]).reshape(-1)
        if task == "detect":
            x0, y0 = pts.min(0) / [w, h]
            x1, y1 = pts.max(0) / [w, h]
            lines.append(
                f"{cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"
            )
        else:  # segment polygon or obb corners: both are "cls x1 y1 x2 y2 ..."
            lines.append(f"{cls} " + " ".join(f"{v:.6f}" for v in norm))
    return lines


def make_dataset(root: Path, task: str, n_train: int = 8, n_val: int = 4, size: int = IMGSZ):
    """Write a tiny dataset for ``task`` ('detect', 'segment' or 'obb'); returns its YAML path."""
    import cv2

    rng = np.random.default_rng({"detect": 0, "segment": 1, "obb": 2}[task])
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = np.full((size, size, 3), 40, np.uint8)
            img += rng.integers(0, 30, img.shape, dtype=np.uint8)  # texture, so BN sees variance
            lines = _draw_objects(rng, img, task)
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.png"), img)
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n"
    )
    return data


def images(data: Path, split: str = "val"):
    """Paths of a generated dataset's images."""
    return sorted(str(p) for p in (data.parent / "images" / split).glob("*.png"))


def train_args(tmp: Path, name: str, epochs: int = 1) -> dict:
    """Smallest CPU training that still runs every stage (validation included)."""
    return dict(
        epochs=epochs,
        imgsz=IMGSZ,
        batch=4,
        workers=0,
        device="cpu",
        amp=False,
        plots=False,
        project=str(tmp / "runs"),
        name=name,
        exist_ok=True,
        verbose=False,
        seed=0,
        deterministic=False,
        mosaic=0.0,
        warmup_epochs=0,
    )


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
