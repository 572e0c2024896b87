"""Batch inference throughput and peak memory.

    python benchmarks/bench_batch.py                      # 10 phantom CTs 192x192x48 + one 512x512x300
    python benchmarks/bench_batch.py --cases 4 --skip-memory --threads 4

1. Throughput: ``segreport infer`` over a folder of N synthetic chest CTs (the package's phantom,
   segreport.phantom, severities CT-0..CT-4, LPS, 1.6x1.6x5 mm) in ONE process (model loaded
   once, next scan loaded while the current one is predicted) vs the same command run once per file,
   a new process each time (the model reloaded per scan, as single-file tools are used). Both sides
   are whole processes timed from outside, so both pay imports; volumes/minute and their ratio come
   from this one run.
2. Prefetch: ``run_batch`` in this process, ``workers=2`` vs ``workers=0`` (same predictor object).
3. Peak memory: one 512x512x300 volume through ``run_batch`` in a fresh process: ``ru_maxrss`` after
   imports + model load, and at the end.

The predictor is the MedSegText bundle's (bundles/medsegtext/configs/inference.json) with an untrained
tiny checkpoint and a word tokenizer written to a temporary bundle; if that cannot be built, a tiny
randomly initialised MONAI 2D UNet run slice-wise (``UNetSlicePredictor`` below). The output says which.
Torch runs ``--threads`` intra-op threads (default 1) in every process: on a small shared machine two
OpenMP threads contending for busy cores made the tiny decoder ~50x slower, which would measure the
machine's load rather than the pipeline. Results: benchmarks/results/batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from common import REPO
from segreport import phantom

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "batch.json"
FINDINGS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "Unilateral pulmonary infection, three infected areas, upper middle lower left lung.",
    "No pulmonary infection.",
]


# ------------------------------------------------------------------------------------- predictors


class UNetSlicePredictor:
    """Fallback model: a tiny MONAI 2D UNet (random weights saved to ``checkpoint``) over axial slices."""

    name = "unet2d-slices"

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 16):
        from monai.networks.nets import UNet

        self.device, self.batch_size, self.checkpoint_path = torch.device(device), batch_size, checkpoint
        self.network = UNet(2, 1, 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
        self.network.load_state_dict(torch.load(checkpoint, map_location="cpu"))
        self.network.to(self.device).eval()

    @torch.inference_mode()
    def predict(self, image, affine, points=None, point_labels=None):
        from segreport.inference.predictor import Prediction
        from segreport.transforms.slicing import axial_axis

        axis = axial_axis(affine)
        slices = np.moveaxis(np.clip((image + 1350.0) / 1500.0, 0, 1).astype(np.float32), axis, 0)
        n, h, w = slices.shape
        ph, pw = -h % 4, -w % 4  # two stride-2 levels need sizes divisible by 4
        mask = np.zeros(slices.shape, dtype=np.uint8)
        for start in range(0, n, self.batch_size):
            x = torch.from_numpy(slices[start:start + self.batch_size])[:, None].to(self.device)
            logits = self.network(torch.nn.functional.pad(x, (0, pw, 0, ph)))[:, 0, :h, :w]
            mask[start:start + len(x)] = (logits > 0).cpu().numpy()
        return Prediction(mask=np.moveaxis(mask, 0, axis))


def write_medsegtext_bundle(root: Path) -> Path:
    """Copy of the MedSegText bundle configs + an untrained tiny checkpoint (its spec holds the tokenizer)."""
    from segreport.models.medsegtext import spec_for
    from segreport.networks import MedSegText
    from segreport.text.tokenizers import build_word_tokenizer

    (root / "configs").mkdir(parents=True)
    for name in ("inference.json", "metadata.json"):
        shutil.copy(REPO / "bundles" / "medsegtext" / "configs" / name, root / "configs" / name)
    tokenizer = build_word_tokenizer(FINDINGS)
    torch.manual_seed(0)
    model = MedSegText.tiny(vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                            bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    (root / "models").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "spec": spec_for(model, tokenizer, image_size=64, max_length=50)},
               root / "models" / "model.pt")
    return root


def write_unet_bundle(root: Path) -> Path:
    from monai.networks.nets import UNet

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(UNet(2, 1, 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).state_dict(), root / "models" / "unet.pt")
    (root / "configs" / "inference.json").write_text(json.dumps({
        "bundle_root": ".", "device": "cpu", "checkpoint": "$@bundle_root + '/models/unet.pt'",
        "predictor": {"_target_": "bench_batch.UNetSlicePredictor", "checkpoint": "@checkpoint", "device": "@device"}}))
    return root


def make_bundle(root: Path) -> tuple[Path, str]:
    """The MedSegText bundle when it builds and predicts, else the UNet fallback; and its description."""
    from segreport.run.bundles import load_bundle_predictor

    try:
        bundle = write_medsegtext_bundle(root / "medsegtext")
        predictor, _ = load_bundle_predictor(bundle, device="cpu")
        image, affine = synthetic_ct((64, 64, 12), (5.0, 5.0, 20.0), seed=0)
        predictor.predict(image, affine)
        return bundle, "MedSegText bundle (bundles/medsegtext/configs/inference.json), tiny config, untrained checkpoint"
    except Exception as exc:  # the fallback keeps the benchmark runnable while MedSegText is in flux
        print(f"MedSegText predictor unavailable ({type(exc).__name__}: {exc}); using the UNet fallback")
        return write_unet_bundle(root / "unet"), "tiny MONAI 2D UNet (random init) run slice-wise"


# ------------------------------------------------------------------------------------------ data


def synthetic_ct(shape, spacing, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Simple chest-like CT in HU, stored LPS: body, two lungs, 1-3 dense lesions. Built by broadcasting
    1D world axes, so the 512x512x300 memory case is generated in seconds and a few hundred MB."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    x = affine[0, 0] * np.arange(shape[0]) + affine[0, 3]
    y = affine[1, 1] * np.arange(shape[1]) + affine[1, 3]
    z = affine[2, 2] * np.arange(shape[2]) + affine[2, 3]
    zh = 0.4 * shape[2] * spacing[2]
    ct = np.full(shape, -1000.0, dtype=np.float32)
    body = (x[:, None] / 150) ** 2 + (y[None, :] / 110) ** 2 <= 1
    ct[body] = 40.0
    for cx in (-75.0, 75.0):
        lung = (((x - cx) / 58) ** 2)[:, None, None] + ((y / 85) ** 2)[None, :, None] + ((z / zh) ** 2)[None, None, :] <= 1
        ct[lung] = -850.0
    for _ in range(rng.integers(1, 4)):
        c = (rng.choice([-75.0, 75.0]), rng.uniform(-40, 40), rng.uniform(-0.5, 0.5) * zh)
        r = rng.uniform(10, 25)
        ball = (((x - c[0]) ** 2)[:, None, None] + ((y - c[1]) ** 2)[None, :, None] + ((z - c[2]) ** 2)[None, None, :]) <= r * r
        ct[ball] = rng.uniform(-100, 40)
    for k in range(shape[2]):  # noise slice by slice: no full-size float64 temporary
        ct[:, :, k] += rng.normal(0, 15, shape[:2]).astype(np.float32)
    return ct, affine


def write_ct(path: Path, ct: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.round(ct).astype(np.int16), affine), path)
    return path


# ------------------------------------------------------------------------------------ measurements


def run_cli(bundle: Path, inputs: Path, output: Path, workers: int, env: dict) -> float:
    cmd = [sys.executable, "-m", "segreport.run.batch", "--bundle", str(bundle), "-i", str(inputs), "-o", str(output),
           "--device", "cpu", "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def bench_throughput(bundle: Path, folder: Path, work: Path, env: dict) -> dict:
    files = sorted(folder.glob("*.nii.gz"))
    batch_s = run_cli(bundle, folder, work / "batch_out", workers=2, env=env)
    per_file_s = sum(run_cli(bundle, f, work / "single_out" / f.name, workers=0, env=env) for f in files)
    n = len(files)
    return {
        "n_cases": n,
        "batch_s": round(batch_s, 2),
        "per_file_processes_s": round(per_file_s, 2),
        "batch_volumes_per_min": round(60 * n / batch_s, 2),
        "per_file_volumes_per_min": round(60 * n / per_file_s, 2),
        "ratio": round(per_file_s / batch_s, 2),
    }


def bench_prefetch(bundle: Path, folder: Path, work: Path) -> dict:
    from segreport.run.batch import run_batch
    from segreport.run.bundles import load_bundle_predictor

    predictor, _ = load_bundle_predictor(bundle, device="cpu")
    times = {}
    for workers in (0, 2):
        start = time.perf_counter()
        summary = run_batch(predictor, folder, work / f"prefetch_{workers}", workers=workers, progress=False)
        times[workers] = time.perf_counter() - start
        assert summary.counts["ok"] == len(summary.cases), summary.cases
    rows = summary.cases  # the workers=2 run: where the time goes per case
    return {
        "workers0_s": round(times[0], 2),
        "workers2_s": round(times[2], 2),
        "speedup": round(times[0] / times[2], 2),
        "mean_per_case_s": {k: round(float(np.mean([r[k] for r in rows])), 3) for k in ("load_s", "wait_s", "predict_s", "write_s")},
    }


MEMORY_SCRIPT = """
import json, resource, sys
from segreport.run.batch import run_batch
from segreport.run.bundles import load_bundle_predictor
predictor, _ = load_bundle_predictor(sys.argv[1], device="cpu")
setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = run_batch(predictor, sys.argv[2], sys.argv[3], workers=1, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"setup_maxrss_mb": setup / 1024, "peak_maxrss_mb": peak / 1024, "case": summary.cases[0]}))
"""


def bench_memory(bundle: Path, shape, work: Path, env: dict) -> dict:
    folder = work / "big"
    folder.mkdir()
    ct, affine = synthetic_ct(shape, (0.7, 0.7, 1.0), seed=99)
    write_ct(folder / "big.nii.gz", ct, affine)
    del ct
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(bundle), str(folder), str(work / "big_out")],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    case = result.pop("case")
    assert case["status"] == "ok", case
    return {
        "shape": list(shape),
        "input_float32_mb": round(int(np.prod(shape)) * 4 / 2**20, 1),
        "setup_maxrss_mb": round(result["setup_maxrss_mb"], 1),
        "peak_maxrss_mb": round(result["peak_maxrss_mb"], 1),
        "volume_processing_mb": round(result["peak_maxrss_mb"] - result["setup_maxrss_mb"], 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "case_timings_s": {k: case[k] for k in ("load_s", "predict_s", "write_s")},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(192, 192, 48), help="phantom shape (default: its own)")
    p.add_argument("--big", type=int, nargs=3, default=(512, 512, 300))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per process (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        work = Path(tmp)
        bundle, predictor = make_bundle(work / "bundles")
        print(f"predictor: {predictor}")
        folder = work / "cases"
        folder.mkdir()
        for i in range(args.cases):
            case = phantom.generate_case(f"case_{i:03d}", f"CT-{i % 5}", seed=0, index=i, shape=tuple(args.shape))
            write_ct(folder / f"{case.case_id}.nii.gz", case.ct, case.affine)
        result = {
            "predictor": predictor,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
            "volume_shape": list(args.shape),
            "command": " ".join(["python", "benchmarks/bench_batch.py", *(argv if argv is not None else sys.argv[1:])]),
        }
        result["throughput"] = bench_throughput(bundle, folder, work, env)
        t = result["throughput"]
        print(f"throughput: batch {t['batch_volumes_per_min']} vol/min vs one process per file "
              f"{t['per_file_volumes_per_min']} vol/min -> {t['ratio']}x")
        result["prefetch"] = bench_prefetch(bundle, folder, work)
        print(f"prefetch: workers=0 {result['prefetch']['workers0_s']} s, workers=2 {result['prefetch']['workers2_s']} s "
              f"-> {result['prefetch']['speedup']}x")
        if not args.skip_memory:
            result["memory"] = bench_memory(bundle, tuple(args.big), work, env)
            m = result["memory"]
            print(f"memory: {'x'.join(map(str, m['shape']))} volume, peak RSS {m['peak_maxrss_mb']} MB "
                  f"({m['setup_maxrss_mb']} MB after imports + model load, float32 volume {m['input_float32_mb']} MB)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
