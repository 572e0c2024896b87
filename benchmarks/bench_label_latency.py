"""Click latency over HTTP from the MONAI Label app: a first click (load + encode + decode) vs a further
click on the same image (decode only: the prompt session and its embedding live on the infer task).

Starts the real server (``segreport label`` on 127.0.0.1, a free port) over a studies folder of phantom
volumes at the demo size (192×192×48), serving the 3D lesion-report bundle trained for one epoch through
its own train.yaml (latency does not depend on how well it is trained), or ``--checkpoint``. For each
study: a first Slicer-style click on its largest lesion, then ``--further`` clicks, each sending every
click so far, as Slicer does. Reported: median wall time per request as the client sees it (HTTP, the
mask NIfTI and the report included) and the server's own breakdown. Writes
``benchmarks/results/label_latency.json``.

    python benchmarks/bench_label_latency.py --checkpoint outputs/demo/lesion_report_3d/models/model.pt  # after make demo
    python benchmarks/bench_label_latency.py                 # a one-epoch model: its masks leak, reports take the full path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import REPO


def _lesion_voxel(label_path: Path) -> list[int]:
    """The most interior voxel of the largest lesion (IJK of the file, as Slicer sends it)."""
    import nibabel as nib
    import numpy as np

    from segreport.inference.geometry import interior_voxel

    return list(interior_voxel(np.asarray(nib.load(label_path).dataobj) > 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--further", type=int, default=4, help="further clicks per study")
    p.add_argument("--checkpoint", help="a lesion_report_3d model.pt (default: train one epoch here)")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_label"))
    a = p.parse_args()
    import requests
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    from segreport.phantom import generate_dataset
    from segreport.label.server import running_server

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    data = out / "phantom"
    generate_dataset(data, n_cases=max(a.studies, 6), seed=1)
    bundle = out / "bundles" / "lesion_report_3d"
    shutil.copytree(REPO / "bundles" / "lesion_report_3d" / "configs", bundle / "configs")
    if a.checkpoint:
        (bundle / "models").mkdir(parents=True)
        shutil.copy(a.checkpoint, bundle / "models" / "model.pt")
    else:
        from monai.bundle import run

        run("training", config_file=[str(bundle / "configs" / "train.yaml")], bundle_root=str(bundle), dataset_dir=str(data),
            output_dir=str(out / "train"), ckpt_dir=str(bundle / "models"), epochs=1, val_interval=1)
    studies = out / "studies"
    studies.mkdir()
    cases = sorted((data / "imagesTr").glob("*.nii.gz"))[: a.studies]
    for image in cases:
        shutil.copy(image, studies / image.name)

    first, further, server_first, server_further = [], [], [], []
    with running_server(studies, [bundle], out / "app", out / "server.log", cwd=REPO) as url:
        for image in cases:
            case = image.name.split(".")[0]
            fg = _lesion_voxel(data / "labelsTr" / image.name)
            clicks = {"foreground": [fg], "background": []}
            for i in range(1 + a.further):
                if i:  # alternate negative / positive clicks around the first one, all sent every time
                    offset = [fg[0] + 3 * i, fg[1] - 2 * i, fg[2]]
                    clicks["background" if i % 2 else "foreground"].append(offset)
                params = {**clicks, "reset_state": i == 0}
                t = time.perf_counter()
                r = requests.post(f"{url}/infer/lesion_report_3d", params={"image": case, "output": "all"},
                                  data={"params": json.dumps(params)}, timeout=600)
                wall = time.perf_counter() - t
                r.raise_for_status()
                result = next(json.loads(part.content) for part in MultipartDecoder.from_response(r).parts
                              if b'name="params"' in part.headers[b"Content-Disposition"])
                assert result["image_encoded"] == (i == 0), result["image_encoded"]
                (first if i == 0 else further).append(wall)
                (server_first if i == 0 else server_further).append(result["latency_s"])

    def med(xs):
        return round(statistics.median(xs), 4)

    def breakdown(rows):
        return {k: med([r[k] for r in rows if k in r]) for k in rows[0]}

    import nibabel as nib
    import torch

    summary = {
        "benchmark": "label_latency", "command": "python benchmarks/bench_label_latency.py" + "".join(
            f" {x}" for x in sys.argv[1:]),
        "setting": {"studies": len(cases), "further_clicks": a.further, "image_shape": list(nib.load(cases[0]).shape),
                    "model": "lesion_report_3d tiny (bundle train.yaml, 1 epoch)" if not a.checkpoint else a.checkpoint},
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "first_click_s": med(first), "further_click_s": med(further), "ratio_first_to_further": round(med(first) / med(further), 2),
        "server_first_click_s": breakdown(server_first), "server_further_click_s": breakdown(server_further),
        "all_first_s": [round(x, 4) for x in first], "all_further_s": [round(x, 4) for x in further],
    }
    path = REPO / "benchmarks" / "results" / "label_latency.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("all_")}, indent=2))


if __name__ == "__main__":
    main()
