"""A whole chest CT through ``segreport infer``, per bundle: where the time goes, against what it must cost.

For each bundle, one CT in HU (the package's phantom, 512x512x300 at 0.7x0.7x1 mm; ``--quick``: 256x256x120)
runs end to end through ``segreport infer`` in a fresh process, with the time of each stage (``stage_s`` of
the run's summary.json: read, plausibility, lung mask, pre-processing, model, post-processing, report,
preview, write) and the process's peak RSS. Two references are measured in the same run:

* ``read_s``: reading the file with nibabel alone (``np.asanyarray(nib.load(path).dataobj)``);
* ``model_s``: the model's own forward passes alone: every call the run made to the network (2D: the slice
  batches; 3D: every ROI encoding and decoding), recorded with its pre-processed inputs and replayed.

``ratio = total_s / (read_s + model_s)``; the target is at most 2 for every bundle, with peak RSS at most
3 GB. Each checkpoint is the bundle's default (tiny) configuration, randomly initialised with seed 0: speed
does not depend on training (the 3D automatic mode's work does, through its candidates: their number is
recorded; ``--checkpoints outputs/demo`` runs the demo's trained models, whose masks are realistic: an
untrained 3D model's mask is half the scan). ``--folder-cases N``: the same CT N times in one folder, for throughput (volumes per minute).
Writes ``benchmarks/results/whole_ct.json`` (``--quick``: ``whole_ct_quick.json``).

    python benchmarks/bench_whole_ct.py --checkpoints outputs/demo   # 512x512x300, four bundles (after make demo)
    python benchmarks/bench_whole_ct.py --quick          # 256x256x120: a fast check
    python benchmarks/bench_whole_ct.py --bundles medsegtext --folder-cases 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BUNDLES, REPO, RESULTS, machine, write_results

import numpy as np

BUNDLE_NAMES = ("medsegtext", "lesion_report_3d", "tmc", "lapft")
FULL, QUICK = (512, 512, 300), (256, 256, 120)
SPACING = {FULL: (0.7, 0.7, 1.0), QUICK: (1.4, 1.4, 2.5)}
TEXT = "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."

# The child process: segreport infer; with "record", every network call is recorded and replayed alone
# afterwards (a run of its own: the recorded inputs would inflate the measured run's memory).
CHILD = r"""
import json, sys, time
import torch
from segreport.run import infer_cli
from segreport.run import bundles as run_bundles

calls = []
def recording(fn):
    def wrapped(*args, **kwargs):
        calls.append((fn, args, kwargs))
        return fn(*args, **kwargs)
    return wrapped

load = run_bundles.load_bundle_predictor
def load_and_record(*args, **kwargs):
    predictor, info = load(*args, **kwargs)
    if hasattr(predictor, "forward"):  # slice-wise 2D models: one call per slice batch
        predictor.forward = recording(predictor.forward)
    else:  # the promptable 3D model: every ROI encoding and decoding
        net = predictor.network
        net.encode_image, net.decode = recording(net.encode_image), recording(net.decode)
    return predictor, info
if sys.argv[2] == "record":
    run_bundles.load_bundle_predictor = infer_cli.load_bundle_predictor = load_and_record

argv = json.loads(sys.argv[1])
t = time.perf_counter()
code = infer_cli.main(argv)
total = time.perf_counter() - t
assert code == 0, code
peak_gb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20
replayed = calls[:]
t = time.perf_counter()
with torch.inference_mode():
    for fn, args, kwargs in replayed:
        fn(*args, **kwargs)
model = time.perf_counter() - t
print("RESULT " + json.dumps({"total_s": total, "model_s": model, "network_calls": len(replayed), "peak_rss_gb": peak_gb}))
"""


def phantom_ct(shape, out: Path) -> Path:
    """The phantom at ``shape`` (generated once into ``out``): one chest CT in HU with lesions."""
    from segreport import phantom

    folder = out / f"phantom_{'x'.join(map(str, shape))}"
    image = folder / "imagesTr" / "case_0000.nii.gz"
    if not image.is_file():
        phantom.generate_dataset(folder, n_cases=1, seed=7, shape=shape, spacing=SPACING[tuple(shape)], export_2d=False)
    return image


def write_bundle(name: str, root: Path, trained: Path | None) -> tuple[Path, str]:
    """A copy of the bundle's configs with ``trained/<name>/models/model.pt`` when there is one (e.g. the
    demo's), else a seeded, untrained checkpoint of its default configuration; and which it is."""
    from segreport.models.untrained import write_untrained_checkpoint

    bundle = root / name
    shutil.copytree(BUNDLES / name / "configs", bundle / "configs", dirs_exist_ok=True)
    source = None if trained is None else trained / name / "models" / "model.pt"
    if source is not None and source.is_file():
        (bundle / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, bundle / "models" / "model.pt")
        return bundle, f"trained: {source}"
    write_untrained_checkpoint(name, bundle / "models" / "model.pt", seed=0)
    return bundle, "untrained (seed 0)"


def nibabel_read_s(path: Path, repeats: int = 2) -> float:
    import nibabel as nib

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.asanyarray(nib.load(path).dataobj)
        best = min(best, time.perf_counter() - t)
    return best


def run_bundle(bundle: Path, inputs: Path, out: Path, threads: int, record: bool = False) -> tuple[dict, list[dict]]:
    argv = ["--bundle", str(bundle), "-i", str(inputs), "-o", str(out), "--device", "cpu", "--no-progress", "--overwrite"]
    if bundle.name in ("tmc", "lapft"):
        argv += ["--text", TEXT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), "record" if record else "plain"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{bundle.name}: segreport infer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    cases = json.loads((out / "summary.json").read_text())["cases"]
    return result, cases


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"a {'x'.join(map(str, QUICK))} volume instead of {'x'.join(map(str, FULL))}")
    p.add_argument("--bundles", nargs="+", default=list(BUNDLE_NAMES), choices=BUNDLE_NAMES)
    p.add_argument("--folder-cases", type=int, default=0, help="also run a folder of N copies of the CT (throughput)")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of each run")
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_whole_ct")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="a folder with <bundle>/models/model.pt to use (e.g. outputs/demo after make demo); others untrained")
    a = p.parse_args(argv)
    shape = QUICK if a.quick else FULL
    image = phantom_ct(shape, a.work)
    read_s = nibabel_read_s(image)
    result = {"command": " ".join(["python benchmarks/bench_whole_ct.py", *(argv if argv is not None else sys.argv[1:])]),
              "shape": list(shape), "spacing": list(SPACING[shape]), "threads": a.threads, "machine": machine(),
              "targets": {"ratio_at_most": 2.0, "peak_rss_gb_at_most": 3.0}, "bundles": {}}
    for name in a.bundles:
        bundle, checkpoint = write_bundle(name, a.work / "bundles", a.checkpoints)
        run, cases = run_bundle(bundle, image, a.work / "out" / name, a.threads)
        recorded, _ = run_bundle(bundle, image, a.work / "out" / f"{name}_recorded", a.threads, record=True)
        run.update(model_s=recorded["model_s"], network_calls=recorded["network_calls"])
        case = cases[0]
        row = {"checkpoint": checkpoint, "total_s": round(run["total_s"], 2), "read_s": round(read_s, 2), "model_s": round(run["model_s"], 2),
               "ratio": round(run["total_s"] / (read_s + run["model_s"]), 2), "peak_rss_gb": round(run["peak_rss_gb"], 2),
               "network_calls": run["network_calls"], "n_lesions": case["n_lesions"],
               "stages": case.get("stage_s", {}), "case_s": {k: case[k] for k in ("load_s", "predict_s", "write_s")}}
        if a.folder_cases:
            folder = a.work / f"folder_{'x'.join(map(str, shape))}"
            folder.mkdir(exist_ok=True)
            for i in range(a.folder_cases):
                if not (folder / f"ct_{i:02d}.nii.gz").exists():
                    shutil.copy(image, folder / f"ct_{i:02d}.nii.gz")
            many, _ = run_bundle(bundle, folder, a.work / "out" / f"{name}_folder", a.threads)
            row["folder"] = {"cases": a.folder_cases, "total_s": round(many["total_s"], 2),
                             "volumes_per_min": round(60 * a.folder_cases / many["total_s"], 2)}
        row["met"] = row["ratio"] <= 2.0 and row["peak_rss_gb"] <= 3.0
        result["bundles"][name] = row
        print(f"{name}: {row['total_s']} s end to end, read {row['read_s']} s + model {row['model_s']} s -> ratio "
              f"{row['ratio']}, peak {row['peak_rss_gb']} GB ({'met' if row['met'] else 'NOT met'}); stages {row['stages']}",
              flush=True)
    # a run of some bundles updates their rows; each row's ratio is within its own run (its own read_s)
    previous = RESULTS / f"{'whole_ct_quick' if a.quick else 'whole_ct'}.json"
    if previous.is_file():
        earlier = json.loads(previous.read_text())
        if earlier.get("shape") == result["shape"]:
            result["bundles"] = {**{k: {**v, "command": v.get("command", earlier.get("command"))} for k, v in earlier["bundles"].items()},
                                 **{k: {**v, "command": result["command"]} for k, v in result["bundles"].items()}}
    write_results("whole_ct_quick" if a.quick else "whole_ct", result)
    return result


if __name__ == "__main__":
    main()
