"""What the lung-lesion models report on real CTs that have no lung lesion, and how good the HU lung mask is.

    python benchmarks/bench_real_scans.py [--medsegtext CKPT] [--lesion-report-3d CKPT]

1. Lung mask: Dice per lung of the HU-threshold mask against TotalSegmentator's lobe labels on every real
   CT in ../shared/data that has them, and the lung volume found in every real CT.
2. The demo models (default: ``outputs/demo/<bundle>/models/model.pt`` from ``make demo``) on the real
   TotalSegmentator CTs (none has a lung lesion), run with ``--allow-no-lungs`` so every scan gets a
   report. "Before" is what a report called pulmonary before the lung check: every predicted component.
   "After": the lesions the report calls pulmonary, and how much of that lies in lesions outside the lungs
   (must be 0 mL: such lesions are listed apart), plus what is listed apart.
The LIDC slices in ../shared/data are single 2D slices: no 3D model or report runs on them.
Results: benchmarks/results/real_scans.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from common import REPO

SHARED = REPO.parent / "shared" / "data" / "totalsegmentator"
SCANS = {"example_ct (abdomen/pelvis)": "example_ct.nii.gz", "example_ct_sm (abdomen, lung bases)": "example_ct_sm.nii.gz",
         "ct_cropped (heart + lungs crop)": "pulmonary_report/ct_cropped.nii.gz", "DICOM series (upper abdomen)": "example_ct_dicom"}


def lung_mask_quality() -> dict:
    from segreport.data.io import load_volume
    from segreport.metrics.segmentation import dice
    from segreport.transforms.lung_mask import lung_mask_from_ct, split_left_right
    from segreport.transforms.lung_regions import lung_label_from_lobes

    ct, affine, _ = load_volume(SHARED / "example_ct_sm.nii.gz")
    ref = lung_label_from_lobes(load_volume(SHARED / "example_seg.nii.gz")[0])
    pred = split_left_right(lung_mask_from_ct(ct, affine), affine)
    out = {"dice_vs_totalsegmentator_lobes": {"example_ct_sm": {
        "right": round(dice(pred == 1, ref == 1), 3), "left": round(dice(pred == 2, ref == 2), 3),
        "reference_ml": round(float((ref > 0).sum() * 27 / 1000), 1), "found_ml": round(float((pred > 0).sum() * 27 / 1000), 1)}},
        "lung_ml_found": {}}
    for name, rel in SCANS.items():
        ct, affine, _ = load_volume(SHARED / rel)
        out["lung_ml_found"][name] = round(float(lung_mask_from_ct(ct, affine).sum() * abs(np.linalg.det(affine[:3, :3])) / 1000), 1)
    return out


def model_reports(checkpoint: Path) -> dict:
    from segreport.models import load
    from segreport.run.batch import run_batch

    predictor = load(checkpoint)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel in SCANS.items():
            out = Path(tmp) / name.split()[0]
            summary = run_batch(predictor, SHARED / rel, out, progress=False, allow_no_lungs=True)
            row = summary.cases[0]
            if row["status"] != "ok":
                rows[name] = {"error": row["error"]}
                continue
            report = json.loads(next(out.glob("*_report.json")).read_text())
            lesions, outside = report["lesions"], report["lesions_outside_lungs"]
            rows[name] = {
                "before_called_pulmonary_ml": round(sum(les["volume_ml"] for les in lesions + outside), 2),
                "after_called_pulmonary_ml": report["total_volume_ml"],
                "after_pulmonary_ml_in_lesions_outside_the_lungs": round(sum(
                    les["volume_ml"] for les in lesions if les["in_lung_fraction"] < 0.1), 2),
                "after_listed_outside_lungs_ml": report["volume_outside_lungs_ml"],
                "finding": report["finding"],
                "warnings": report["warnings"],
            }
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--medsegtext", default=str(REPO / "outputs" / "demo" / "medsegtext" / "models" / "model.pt"))
    p.add_argument("--lesion-report-3d", default=str(REPO / "outputs" / "demo" / "lesion_report_3d" / "models" / "model.pt"))
    a = p.parse_args()
    if not SHARED.is_dir():
        print(f"real fixtures not found at {SHARED}")
        return 2
    result = {"benchmark": "real_scans", "command": "python benchmarks/bench_real_scans.py", "lung_mask": lung_mask_quality(),
              "models": {}}
    for bundle, ckpt in (("medsegtext", a.medsegtext), ("lesion_report_3d", a.lesion_report_3d)):
        if Path(ckpt).is_file():
            result["models"][bundle] = {"checkpoint": ckpt, "scans": model_reports(Path(ckpt))}
        else:
            print(f"{bundle}: no checkpoint at {ckpt} (run make demo first); skipped")
    out = REPO / "benchmarks" / "results" / "real_scans.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
