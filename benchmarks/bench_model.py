"""Whole-model benchmark: YOLO11 converted to int8 DSConv against float PyTorch and the runtimes a
CPU user would pick instead.

For each model (yolo11n, yolo11s) at 640 px, batch 1, on this CPU, one row per runtime:

- ours: the fused float model in eager PyTorch (the baseline), the model converted with
  ``dsconv_ext.quantize`` (8, 7 and 4 bits; 7 bits is the weight precision oneDNN and
  onnxruntime's ``reduce_range`` compute with on CPUs without VNNI), and ``float+stand-ins``:
  the float model with only the exact pooling / upsampling stand-ins, the ``FastDFL`` box
  decoder and the ``FastStemConv`` float stem ``quantize`` also installs, so that
  float+stand-ins / int8 is what the DSConv kernel itself is worth;
- peers (``pip install .[bench]``; a row whose package is missing is skipped with the reason):
  OpenVINO at its default precision (it picks bf16 where the CPU has it) and int8 through NNCF
  (MIXED preset, the Detect head's postprocessing left in float, as ``yolo export
  format=openvino int8=True`` does), onnxruntime fp32 and int8 (static QDQ, per-channel weights,
  the same head ops left in float), and ``torch.compile`` of the float model (inductor);
- checkpoint / model file sizes; with accuracy (the default): mAP50 against the labels for our
  rows, and the agreement of the converted model's detections with the float model's (mAP50
  and mean box IoU, float predictions taken as truth).

Timing: every runtime in its own fresh process (``--worker``; their thread pools spin and would
distort each other in one process), same input image, same thread count, warm-up calls, then
the median of ``--rounds`` calls; the processes are cycled ``--cycles`` times (A B C ... A B C)
and each row reports the median of its per-process medians and their spread. The in-process
interleaved float vs int8 comparison (the ratio this project reported before) is printed too.

Weights: ``--weights-dir`` holding ``yolo11n.pt`` / ``yolo11s.pt`` (any ultralytics
checkpoint). Without them (no network here) each model is trained from scratch on a synthetic
shapes dataset (cached in ``--work``) so that it makes real detections to compare; with
``--no-accuracy`` nothing is trained: random weights (fixed seed, the stock 80-class head) are
enough for latency.

    python benchmarks/bench_model.py                  # both models, table on stdout
    python benchmarks/bench_model.py --quick           # smoke run: yolo11n, few rounds/epochs
    python benchmarks/bench_model.py --models yolo11n yolo11s --no-accuracy --threads 2
    python benchmarks/bench_model.py --variants int8 onnxruntime --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _runtimes  # noqa: E402
from _timing import dump_json, environment, print_header, print_table  # noqa: E402

os.environ.setdefault("YOLO_OFFLINE", "1")
# Converted models record their forward graph on the third call (dsconv_ext.yolo.graph_capture),
# inside the warm-up: the steady state of a stream. By default they wait for 10 s of calls.
os.environ.setdefault("DSCONV_EXT_CAPTURE_AFTER_S", "0")
IMGSZ = 640
CLASSES = ("box", "disc", "triangle")
VARIANTS = tuple(k for k in _runtimes.RUNTIMES if k != "float")
SCRIPT = os.path.abspath(__file__)


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


def synthetic_batch(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` images drawn like the dataset's, as the models take them: RGB, [0, 1], NCHW float32."""
    rng = np.random.default_rng(seed)
    imgs = [draw_image(rng, size)[0][..., ::-1] for _ in range(n)]  # cv2 draws BGR
    return np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2), np.float32) / 255


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


def weights_for(name: str, args, data: Optional[Path]) -> Optional[Path]:
    """Pretrained weights if given; else, for latency only, None (random weights: nothing is
    trained); else a model trained here on the synthetic shapes."""
    if args.weights_dir and (Path(args.weights_dir) / f"{name}.pt").is_file():
        return Path(args.weights_dir) / f"{name}.pt"
    if not args.accuracy:
        return None
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


def predictions(yolo, images: List[str], imgsz: int) -> List[Dict]:
    out = []
    for r in yolo.predict(images, imgsz=imgsz, conf=0.25, verbose=False, batch=1):
        b = r.boxes
        out.append({"xyxy": b.xyxy.numpy(), "cls": b.cls.numpy(), "conf": b.conf.numpy()})
    return out


# ---------------------------------------------------------------- the benchmark
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _worker_env(args) -> Dict[str, str]:
    """Environment of a worker process: imports the dsconv_ext this process imported, offline,
    every runtime's OpenMP pool (if any) sized like the rest."""
    import dsconv_ext

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(dsconv_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    env.update(YOLO_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    return env


def prepare_model(name: str, args, data: Optional[Path], env: Dict[str, str]) -> Dict:
    """Weights, input, exports and int8 calibrations of one model, made in a process of its own
    (so that no runtime's thread pool lives on in this one)."""
    weights = weights_for(name, args, data)
    manifest = Path(args.work) / "artifacts" / f"{name}-{args.imgsz}.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, SCRIPT, "--worker", "prepare", "--models", name,
           "--manifest", str(manifest), "--imgsz", str(args.imgsz), "--threads", str(args.threads),
           "--calib-images", str(args.calib_images), "--seed", str(args.seed),
           "--variants", *args.variants]  # fmt: skip
    cmd += ["--weights", str(weights)] if weights else []
    cmd += [] if args.depthwise else ["--no-depthwise"]
    _log(f"# {name}: preparing the runtimes' models ({weights or 'random weights'})")
    rc, tail = _runtimes.run_subprocess(cmd, env, args.prepare_timeout)
    if rc != 0:
        raise RuntimeError(f"preparing {name} failed (rc {rc}):\n{tail}")
    with open(manifest) as f:
        man = json.load(f)
    man["manifest"] = str(manifest)
    return man


def _worker_cmd(key: str, man: Dict, args, json_out: Path) -> List[str]:
    return [sys.executable, SCRIPT, "--worker", key, "--manifest", man["manifest"],
            "--threads", str(args.threads), "--rounds", str(args.rounds),
            "--warmup", str(args.warmup), "--json-out", str(json_out)]  # fmt: skip


def _failure(tail: str) -> str:
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def time_model(name: str, man: Dict, args, env: Dict[str, str]):
    """Each runtime in its own processes, cycled; returns the rows and the in-process
    interleaved medians."""
    runs = Path(man["input"]).parent / "runs"
    runs.mkdir(exist_ok=True)
    keys = [k for k in ["float", *args.variants] if k not in man["skipped"]]
    results: Dict[str, List[Dict]] = {k: [] for k in keys}
    failed: Dict[str, str] = {}
    # An inductor cache of this model's own: its first torch.compile process compiles cold unless
    # an earlier run (same --work) left the kernels there; the later processes find them.
    cache = Path(args.work) / "inductor-cache" / f"{name}-{args.imgsz}"
    cache_state = "warm (earlier run)" if cache.is_dir() and any(cache.iterdir()) else "cold"
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    for cycle in range(args.cycles):
        for key in keys:
            if key in failed:
                continue
            out = runs / f"{key}-{cycle}.json"
            cmd = _worker_cmd(key, man, args, out)
            if args.save_outputs:
                cmd += ["--save-output", str(runs / f"{key}-{cycle}.npy")]
            timeout = args.worker_timeout + (args.compile_timeout if key == "compile" else 0)
            rc, tail = _runtimes.run_subprocess(cmd, env, timeout)
            if rc is None:
                what = "compiling and timing" if key == "compile" else "the worker"
                failed[key] = f"{what} took more than {timeout:.0f} s"
            elif rc != 0:
                failed[key] = f"worker failed: {_failure(tail)}"
            else:
                with open(out) as f:
                    results[key].append(json.load(f))
            got = results[key][-1]["median ms"] if rc == 0 else None
            _log(f"# {name} cycle {cycle + 1}/{args.cycles} {_runtimes.RUNTIMES[key].label}: "
                 + (f"{got:.2f} ms" if got is not None else failed[key]))  # fmt: skip

    summary = {k: _runtimes.summarize(v) for k, v in results.items() if v}
    base = summary.get("float", {}).get("latency ms")
    ours = summary.get("int8", {}).get("latency ms")
    rows = []
    for key in ["float", *args.variants]:
        rt = _runtimes.RUNTIMES[key]
        row: Dict[str, object] = {"model": name, "variant": rt.label, "runtime": key,
                                  "peer": rt.peer}  # fmt: skip
        if key in summary:
            ms = summary[key]["latency ms"]
            row["precision"] = results[key][0]["info"]["precision"]
            row.update(summary[key])
            if base:
                row["speed-up vs float eager"] = base / ms
            if ours:
                row["dsconv_ext int8 vs this"] = ms / ours
            row["per process"] = results[key]
            if key == "compile":
                row["inductor cache at start"] = cache_state
        if key in man["files"] and key not in ("stand-ins", "compile"):  # those reuse float's
            row["model file MiB"] = _runtimes.file_mib(man["files"][key])
        reason = man["skipped"].get(key) or failed.get(key)
        if reason:
            row["note"] = f"skipped: {reason}" if key not in summary else reason
        rows.append(row)

    interleaved = {}
    torch_keys = [k for k in ("float", "stand-ins", *_runtimes.OURS) if k in summary]
    if args.interleaved and "int8" in torch_keys:
        out = runs / "interleaved.json"
        rc, tail = _runtimes.run_subprocess(
            _worker_cmd("interleaved", man, args, out) + ["--variants", *torch_keys[1:]],
            env,
            args.worker_timeout,
        )
        if rc == 0:
            with open(out) as f:
                interleaved = json.load(f)
        else:
            _log(f"# {name}: interleaved worker failed: {_failure(tail)}")
    return rows, interleaved


def accuracy_columns(rows: List[Dict], man: Dict, args, data: Path) -> None:
    """mAP50 against the labels for our rows, and agreement with the float model's detections."""
    from ultralytics import YOLO

    images = sorted(str(p) for p in (data.parent / "images" / "val").glob("*.jpg"))[: args.images]
    ref = predictions(YOLO(man["files"]["float"]), images, args.imgsz)
    for row in rows:
        ck = man["files"].get(row["runtime"])
        if row["runtime"] not in ("float", *_runtimes.OURS) or ck is None:
            continue
        metrics = YOLO(ck).val(
            data=str(data), imgsz=args.imgsz, batch=1, workers=0, plots=False, verbose=False,
            fraction=1.0,
        )  # fmt: skip
        row["mAP50 (labels)"] = float(metrics.box.map50)
        if row["runtime"] != "float":
            agree = agreement(predictions(YOLO(ck), images, args.imgsz), ref)
            row["mAP50 vs float preds"] = agree["map50"]
            row["mean IoU vs float"] = agree["mean_iou"]


def runtime_notes(rows: List[Dict], man: Dict) -> List[str]:
    """What each runtime actually did: precision, what int8 left in float, compile time."""
    name, notes = man["model"], []
    for row in rows:
        key, per = row["runtime"], row.get("per process")
        if not per:
            continue
        info = per[0]["info"]
        if key in ("openvino", "openvino-int8"):
            notes.append(f"{name} {row['variant']}: INFERENCE_PRECISION_HINT "
                         f"{info['INFERENCE_PRECISION_HINT']}, {info['threads']} threads, "
                         f"{info['streams']} stream(s)")  # fmt: skip
        if key in ("openvino-int8", "onnxruntime-int8"):
            prep = man["info"][key]
            count = prep.get("FakeQuantize ops", prep.get("QuantizeLinear nodes"))
            kind = "FakeQuantize ops" if "FakeQuantize ops" in prep else "QuantizeLinear nodes"
            notes.append(f"{name} {row['variant']}: calibrated on {prep['calibration images']} "
                         f"synthetic images in {prep['prepare s']:.0f} s; {count} {kind}; left in "
                         f"float: {prep['left in float']}")  # fmt: skip
        if key == "compile":
            first = [p["warm-up call s"][0] for p in per]
            later = ", ".join(f"{s:.0f}" for s in first[1:])
            cached = f", {later} s in the later processes (cached)" if later else ""
            notes.append(
                f"{name} {row['variant']}: first call (compilation) {first[0]:.0f} s with a "
                f"{row['inductor cache at start']} inductor cache{cached}"
            )
    return notes


def summary_line(rows: List[Dict]) -> Optional[str]:
    """The headline: our int8 against the fastest peer measured."""
    peers = [r for r in rows if r["peer"] and "latency ms" in r]
    ours = next((r for r in rows if r["runtime"] == "int8" and "latency ms" in r), None)
    if not peers or ours is None:
        return None
    best = min(peers, key=lambda r: r["latency ms"])
    ratio = best["latency ms"] / ours["latency ms"]
    # The same question asked of each runtime's least disturbed process: when another user's
    # load hit some processes, the medians and the best processes can disagree.
    best_b = min(peers, key=lambda r: r["best process ms"])
    ratio_b = best_b["best process ms"] / ours["best process ms"]
    if (ratio > 1) != (ratio_b > 1):
        verdict = "undecided: the medians and the best processes disagree (host load)"
    elif ratio > 1:
        verdict = "faster than every peer row"
    else:
        verdict = f"slower than {best['variant']}"
    return (
        f"# {ours['model']}: fastest peer {best['variant']} ({best['precision']}) "
        f"{best['latency ms']:.1f} ms; dsconv_ext int8 {ours['latency ms']:.1f} ms = {ratio:.2f}x "
        f"its speed; best processes: {best_b['variant']} {best_b['best process ms']:.1f} ms, "
        f"int8 {ours['best process ms']:.1f} ms = {ratio_b:.2f}x ({verdict})"
    )


def run_worker(args) -> int:
    """The child side: ``--worker prepare``, ``interleaved`` or one runtime's key."""
    torch.set_num_threads(args.threads)
    if args.worker == "prepare":
        import dsconv_ext  # noqa: F401  (registers with ultralytics, loads the kernels)

        # One image timed, the others for int8 calibration (and the random model's BatchNorm
        # statistics): drawn like the dataset's, seeded apart from it.
        images = synthetic_batch(args.calib_images + 1, args.imgsz, args.seed + 1)
        man = _runtimes.prepare(
            Path(args.manifest).with_suffix(""), args.models[0], args.variants, args.weights,
            images[:1], images[1:], args.seed, args.depthwise, _log,
        )  # fmt: skip
        dump_json(args.manifest, man)
        return 0
    if args.worker == "interleaved":
        from _timing import time_interleaved

        with open(args.manifest) as f:
            man = json.load(f)
        x = np.load(man["input"])
        fns = {}
        for key in ["float", *args.variants]:
            fns[_runtimes.RUNTIMES[key].label] = _runtimes.load(key, man, args.threads, x)[0]
        with torch.inference_mode():
            ms = time_interleaved(fns, rounds=args.rounds, warmup=args.warmup)
        dump_json(args.json_out, ms)
        return 0
    _runtimes.worker(args.worker, args.manifest, args.threads, args.rounds, args.warmup,
                     args.json_out, args.save_output)  # fmt: skip
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["yolo11n", "yolo11s"])
    p.add_argument("--weights-dir", help="directory with yolo11n.pt / yolo11s.pt")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "dsconv_ext_bench_model"))
    p.add_argument("--imgsz", type=int, default=IMGSZ)
    p.add_argument("--rounds", type=int, default=30, help="timed calls per process")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per process first")
    p.add_argument("--cycles", type=int, default=2, help="processes per runtime, cycled")
    p.add_argument("--images", type=int, default=64, help="validation images for agreement")
    p.add_argument("--calib-images", type=int, default=16, help="int8 calibration images")
    p.add_argument("--epochs", type=int, default=30, help="synthetic training epochs")
    p.add_argument("--train-imgsz", type=int, default=320)
    p.add_argument("--seed", type=int, default=0, help="random weights and images")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for all runtimes")
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
        help="latency and sizes only: no training (random weights), no mAP, no agreement",
    )
    p.add_argument(
        "--no-depthwise",
        dest="depthwise",
        action="store_false",
        help="convert with depthwise=False (depth-wise convs left in float)",
    )
    p.add_argument(
        "--no-interleaved",
        dest="interleaved",
        action="store_false",
        help="skip the in-process interleaved float vs int8 comparison",
    )
    p.add_argument("--compile-timeout", type=float, default=300, help="s for torch.compile")
    p.add_argument("--worker-timeout", type=float, default=600, help="s per timing process")
    p.add_argument("--prepare-timeout", type=float, default=1800, help="s per model's exports")
    p.add_argument("--save-outputs", action="store_true", help="workers save their output")
    p.add_argument("--quick", action="store_true", help="yolo11n only, few rounds (smoke test)")
    p.add_argument("--json", help="write results as JSON to this path ('-' for stdout)")
    # A worker process's arguments (this script runs itself once per runtime).
    for flag in ("--worker", "--manifest", "--json-out", "--save-output", "--weights"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.quick:
        args.models, args.rounds, args.cycles, args.images = ["yolo11n"], 5, 1, 8
        args.epochs = min(args.epochs, 2)
        args.work = str(Path(args.work) / "quick")

    import dsconv_ext  # noqa: F401  (registers with ultralytics, loads the kernels)
    from dsconv_ext.dsconv.ops import dsconv_backend_report

    load_before = os.getloadavg()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    data = None
    if args.accuracy:
        n_train, n_val = (32, 8) if args.quick else (256, 64)
        data = make_dataset(work / "shapes", n_train, n_val)
    env = _worker_env(args)
    t0 = time.perf_counter()
    rows, interleaved, manifests = [], {}, {}
    for name in args.models:
        man = prepare_model(name, args, data, env)
        model_rows, interleaved[name] = time_model(name, man, args, env)
        if args.accuracy:
            accuracy_columns(model_rows, man, args, data)
        rows += model_rows
        manifests[name] = man
    load_after = os.getloadavg()

    torch.set_num_threads(args.threads)  # the header reports the thread count every runtime used
    info = environment()
    info["peers"] = _runtimes.versions()
    info["load average before"], info["load average after"] = load_before, load_after
    cols = ["model", "variant", "precision", "latency ms", "spread %", "best process ms",
            "speed-up vs float eager", "dsconv_ext int8 vs this", "model file MiB"]  # fmt: skip
    if args.accuracy:
        cols += ["mAP50 (labels)", "mAP50 vs float preds", "mean IoU vs float"]
    cols.append("note")
    peers = ", ".join(f"{k} {v}" for k, v in info["peers"].items())
    print()
    print_header("bench_model", info)
    print(f"# peers: {peers}; dsconv2d cpu backend: "
          f"{dsconv_backend_report().get('cpu', {}).get('backend')}")  # fmt: skip
    print(f"# dsconv_ext int8: the recorded-graph forward, recorded during the warm-up "
          f"(DSCONV_EXT_CAPTURE_AFTER_S={os.environ.get('DSCONV_EXT_CAPTURE_AFTER_S')}; by "
          f"default after 10 s of calls with one input shape)")  # fmt: skip
    print(f"# {args.imgsz} px, batch 1, {args.threads} threads in every runtime; each runtime in "
          f"its own processes ({args.cycles} cycles A B C ... A B C): {args.warmup} warm-up calls, "
          f"median of {args.rounds} calls; latency = median of the per-process medians, spread = "
          f"(max - min) / median of them, best process = the lowest of them; 'dsconv_ext int8 "
          f"vs this' = this latency / int8's (above 1: int8 faster)")  # fmt: skip
    for name, man in manifests.items():
        loads = [p["load average 1 min"] for r in rows if r["model"] == name
                 for p in r.get("per process", ())]  # fmt: skip
        seen = (
            f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} as its workers ended"
            if loads
            else ""
        )
        print(f"# {name} weights: {man['weights']}{seen}")
    print(f"# load average (1/5/15 min) before {' '.join(f'{v:.2f}' for v in load_before)}, "
          f"after {' '.join(f'{v:.2f}' for v in load_after)}; "
          f"{time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print_table(rows, cols)
    print()
    for name in args.models:
        line = summary_line([r for r in rows if r["model"] == name])
        if line:
            print(line)
    for name, man in manifests.items():
        for note in runtime_notes([r for r in rows if r["model"] == name], man):
            print(f"# {note}")
    inter_rows = []
    for name, ms in interleaved.items():
        base = ms.get("float eager")
        for label, v in ms.items():
            inter_rows.append({"model": name, "variant": label, "latency ms": v,
                               "speed-up vs float eager": base / v if base else ""})  # fmt: skip
    if inter_rows:
        print(
            "\n# in-process interleaved: the torch variants in one process, alternated call by "
            f"call, medians of {args.rounds} rounds (the float/int8 ratio reported so far)"
        )
        print_table(inter_rows, ["model", "variant", "latency ms", "speed-up vs float eager"])
    if args.json:
        dump_json(args.json, {"environment": info, "args": vars(args), "rows": rows,
                              "interleaved": interleaved, "manifests": manifests})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
