"""Whole-model benchmark: YOLO11 float in eager PyTorch vs converted to int8 DSConv vs ONNX Runtime.

For each model (yolo11n, yolo11s) at 640 px, batch 1, on this CPU:

- latency of the fused float model in eager PyTorch (the baseline), of the model converted with
  ``dsconv_ext.quantize`` (8 and 4 bits, the int8 kernel), and of the float model exported to
  ONNX and run by onnxruntime (when installed); interleaved rounds, medians (``_timing``, whose
  allocator warm-up puts every variant in a model's steady state). ``quantize`` also swaps the
  max pools and upsamplings for exact faster stand-ins (``replace_pooling``) and the box
  decoder for a faster one (``FastDFL``): the row ``float+stand-ins`` is the float model with
  only those swaps, so that the share of the speed-up owed to DSConv (the kernel and the
  in-place concatenations it allows) can be read off as float+stand-ins / int8;
- checkpoint sizes: ultralytics' float ``best.pt`` (fp16) and the converted ``-ds8`` / ``-ds4``;
- accuracy: mAP50 against the labels for each model, and the agreement of the converted model's
  detections with the float model's (mAP50 and mean box IoU, float predictions taken as truth).

Weights: ``--weights-dir`` holding ``yolo11n.pt`` / ``yolo11s.pt`` (any ultralytics checkpoint).
Without them (no network here) each model is trained from scratch on a synthetic shapes dataset
(cached in ``--work``), so that it makes real detections to compare.

    python benchmarks/bench_model.py                 # both models, table on stdout
    python benchmarks/bench_model.py --quick          # smoke run: yolo11n, few rounds/epochs
    python benchmarks/bench_model.py --json out.json
    python benchmarks/bench_model.py --models yolo11n --variants int8 --no-accuracy  # speed only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (  # noqa: E402
    dump_json,
    environment,
    print_header,
    print_table,
    time_interleaved,
)

os.environ.setdefault("YOLO_OFFLINE", "1")
IMGSZ = 640
CLASSES = ("box", "disc", "triangle")
VARIANTS = ("int8", "int4", "onnxruntime")


# ---------------------------------------------------------------- synthetic data and weights
def draw_image(rng, size: int):
    """A textured background with 1-6 filled shapes; returns image and YOLO label lines."""
    import cv2

    img = rng.integers(60, 200, (1, 1, 3)).astype(np.uint8) + np.zeros((size, size, 3), np.uint8)
    noise = cv2.GaussianBlur(rng.integers(0, 60, (size, size, 3)).astype(np.uint8), (9, 9), 0)
    img = cv2.add(img, noise)
    lines = []
    for _ in range(rng.integers(1, 7)):
        cls = int(rng.integers(0, len(CLASSES)))
        w, h = (int(v) for v in rng.integers(size // 16, size // 3, 2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if cls == 0:
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), color, -1)
        elif cls == 1:
            cv2.ellipse(img, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, color, -1)
        else:
            pts = np.array([[x0 + w // 2, y0], [x0, y0 + h], [x0 + w, y0 + h]], np.int32)
            cv2.fillPoly(img, [pts], color)
        lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} "
                     f"{w / size:.6f} {h / size:.6f}")  # fmt: skip
    return img, lines


def make_dataset(root: Path, n_train: int, n_val: int) -> Path:
    import cv2

    data = root / "data.yaml"
    if data.exists():
        return data
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, lines = draw_image(rng, IMGSZ)
            cv2.imwrite(str(root / "images" / split / f"{i:04d}.jpg"), img)
            (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES))
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data


def weights_for(name: str, args, data: Path) -> Path:
    """Pretrained weights if given, else a model trained here on the synthetic shapes."""
    if args.weights_dir and (Path(args.weights_dir) / f"{name}.pt").is_file():
        return Path(args.weights_dir) / f"{name}.pt"
    best = Path(args.work) / "train" / name / "weights" / "best.pt"
    if best.is_file():
        return best
    from ultralytics import YOLO

    print(f"# training {name} on synthetic shapes ({args.epochs} epochs at {args.train_imgsz} px)",
          file=sys.stderr, flush=True)  # fmt: skip
    YOLO(f"{name}.yaml").train(
        data=str(data), epochs=args.epochs, imgsz=args.train_imgsz, batch=16, workers=0,
        device="cpu", amp=False, plots=False, project=str(Path(args.work) / "train"), name=name,
        exist_ok=True, verbose=False, seed=0,
    )  # fmt: skip
    return best


# ---------------------------------------------------------------- agreement metrics
def _ap(tp: np.ndarray, conf: np.ndarray, n_gt: int) -> float:
    """COCO-style 101-point interpolated average precision of one class."""
    if n_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    order = np.argsort(-conf)
    tp = tp[order]
    recall = np.cumsum(tp) / n_gt
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope
    grid = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, grid, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def agreement(preds: List[Dict], refs: List[Dict], iou_thr: float = 0.5) -> Dict[str, float]:
    """mAP50 of ``preds`` scored against ``refs`` taken as ground truth, and the mean IoU of
    matched boxes. Each entry: {'xyxy': [n, 4], 'cls': [n], 'conf': [n]}."""
    from torchvision.ops import box_iou

    per_cls = {}  # cls -> (tp list, conf list, n_gt)
    ious = []
    for p, r in zip(preds, refs):
        classes = set(p["cls"].tolist()) | set(r["cls"].tolist())
        for c in classes:
            pm, rm = p["cls"] == c, r["cls"] == c
            tps, confs, n_gt = per_cls.setdefault(c, ([], [], [0]))
            n_gt[0] += int(rm.sum())
            pb, pc, rb = p["xyxy"][pm], p["conf"][pm], r["xyxy"][rm]
            order = np.argsort(-pc)
            taken = np.zeros(len(rb), bool)
            iou = box_iou(torch.from_numpy(pb), torch.from_numpy(rb)).numpy() if len(rb) else None
            for i in order:
                hit = 0
                if iou is not None:
                    cand = np.where(~taken & (iou[i] >= iou_thr))[0]
                    if len(cand):
                        j = cand[np.argmax(iou[i, cand])]
                        taken[j], hit = True, 1
                        ious.append(iou[i, j])
                tps.append(hit)
                confs.append(pc[i])
    aps = [_ap(np.array(t, float), np.array(cf), n[0]) for t, cf, n in per_cls.values()]
    aps = [a for a in aps if not np.isnan(a)]
    return {"map50": float(np.mean(aps)) if aps else float("nan"),
            "mean_iou": float(np.mean(ious)) if ious else float("nan")}  # fmt: skip


def predictions(yolo, images: List[str]) -> List[Dict]:
    out = []
    for r in yolo.predict(images, imgsz=IMGSZ, conf=0.25, verbose=False, batch=1):
        b = r.boxes
        out.append({"xyxy": b.xyxy.numpy(), "cls": b.cls.numpy(), "conf": b.conf.numpy()})
    return out


# ---------------------------------------------------------------- the benchmark
def bench_model(name: str, args, data: Path) -> List[Dict[str, object]]:
    from ultralytics import YOLO

    from dsconv_ext.yolo.convert import convert_checkpoint

    best = weights_for(name, args, data)
    work = Path(args.work)
    ckpts = {"float": best}
    for bits in (8, 4):
        if f"int{bits}" in args.variants:
            ckpts[f"int{bits}"] = work / f"{name}-ds{bits}.pt"
            convert_checkpoint(
                str(best), str(ckpts[f"int{bits}"]), bits=bits, depthwise=args.depthwise
            )

    from dsconv_ext.yolo.convert import replace_pooling
    from dsconv_ext.yolo.fast_dfl import use_fast_dfl

    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    models = {"float": YOLO(str(best)).model.float().fuse(verbose=False).eval()}
    if any(k in ckpts for k in ("int8", "int4")):
        models["float+stand-ins"] = copy.deepcopy(models["float"])
        replace_pooling(models["float+stand-ins"])
        use_fast_dfl(models["float+stand-ins"])
    for k in ("int8", "int4"):
        if k in ckpts:
            models[k] = YOLO(str(ckpts[k])).model.float().eval()
    fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
    # ultralytics' select_device() sets torch to cpu_count - 1 threads (1 here) when it loads or
    # exports a model: time every variant with the same, requested thread count.
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        ms = time_interleaved(fns, rounds=args.rounds, warmup=3)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None and "onnxruntime" in args.variants:
        onnx_file = YOLO(str(best)).export(
            format="onnx", imgsz=IMGSZ, simplify=False, verbose=False
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        # Timed on its own: onnxruntime's pool spins after each run, and interleaved with torch's
        # OpenMP threads the two steal each other's cores (torch measured 10x slower that way).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(onnx_file, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        ms.update(time_interleaved({"onnxruntime float": lambda: sess.run(None, feed)},
                                   rounds=args.rounds, warmup=3))  # fmt: skip
    if not args.accuracy:
        return [{"model": name, "variant": k, "latency ms": v,
                 "speed-up vs float eager": ms["float"] / v} for k, v in ms.items()]  # fmt: skip

    images = sorted(str(p) for p in (data.parent / "images" / "val").glob("*.jpg"))[: args.images]
    ref = predictions(YOLO(str(best)), images)
    rows = []
    for k, fn_ms in ms.items():
        row = {"model": name, "variant": k, "latency ms": fn_ms,
               "speed-up vs float eager": ms["float"] / fn_ms}  # fmt: skip
        ck = ckpts.get(k)
        if ck is not None:
            row["checkpoint MiB"] = os.path.getsize(ck) / 2**20
            metrics = YOLO(str(ck)).val(
                data=str(data), imgsz=IMGSZ, batch=1, workers=0, plots=False, verbose=False,
                fraction=1.0,
            )  # fmt: skip
            row["mAP50 (labels)"] = float(metrics.box.map50)
            if k != "float":
                agree = agreement(predictions(YOLO(str(ck)), images), ref)
                row["mAP50 vs float preds"] = agree["map50"]
                row["mean IoU vs float"] = agree["mean_iou"]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["yolo11n", "yolo11s"])
    p.add_argument("--weights-dir", help="directory with yolo11n.pt / yolo11s.pt")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "dsconv_ext_bench_model"))
    p.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--images", type=int, default=64, help="validation images for agreement")
    p.add_argument("--epochs", type=int, default=30, help="synthetic training epochs")
    p.add_argument("--train-imgsz", type=int, default=320)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for all variants")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="what to time besides the float eager baseline (always timed)",
    )
    p.add_argument(
        "--no-accuracy",
        dest="accuracy",
        action="store_false",
        help="latency only: skip checkpoint sizes, mAP and agreement",
    )
    p.add_argument(
        "--no-depthwise",
        dest="depthwise",
        action="store_false",
        help="convert with depthwise=False (depth-wise convs left in float)",
    )
    p.add_argument("--quick", action="store_true", help="yolo11n only, few rounds (smoke test)")
    p.add_argument("--json", help="write results as JSON to this path ('-' for stdout)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.images = ["yolo11n"], 3, 8
        args.epochs = min(args.epochs, 2)
        args.work = str(Path(args.work) / "quick")

    import dsconv_ext  # noqa: F401  (registers with ultralytics, loads the kernels)
    from dsconv_ext.dsconv.ops import dsconv_backend_report

    Path(args.work).mkdir(parents=True, exist_ok=True)
    n_train, n_val = (32, 8) if args.quick else (256, 64)
    data = make_dataset(Path(args.work) / "shapes", n_train, n_val)
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        rows += bench_model(name, args, data)
    cols = ["model", "variant", "latency ms", "speed-up vs float eager", "checkpoint MiB",
            "mAP50 (labels)", "mAP50 vs float preds", "mean IoU vs float"]  # fmt: skip
    env = environment()
    print()
    print_header("bench_model", env)
    print(f"# {IMGSZ} px, batch 1, {args.threads} threads, dsconv2d cpu backend: "
          f"{dsconv_backend_report().get('cpu', {}).get('backend')}; medians of {args.rounds} "
          f"interleaved rounds; agreement on {args.images} synthetic images "
          f"({time.perf_counter() - t0:.0f} s)\n")  # fmt: skip
    print_table(rows, cols)
    if args.json:
        dump_json(args.json, {"environment": env, "rows": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
