"""The ``segreport`` command: a thin layer over the product path (segreport.run) and the demo.

  segreport synth --out DIR [--cases N] [--seed S] [--shape X Y Z]   synthetic chest-CT phantom
  segreport infer --bundle NAME|FOLDER -i INPUT -o OUTPUT_DIR ...  batch inference (see --help)
  segreport evaluate -p PRED_DIR -g LABEL_DIR [--dataset dataset.json]  score predictions (Dice, HD95, text, attributes);
                                                                         exit 1 when a case is missing or cannot be scored
  segreport label --studies DIR [--host 127.0.0.1] [--port 8000] [--bundles ...]  MONAI Label server (Slicer, OHIF)
  segreport bundles                                                  the bundles, where they are, whether trained weights are found
  segreport demo [--out DIR]                                         the `make demo` job
  segreport --version
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _synth(argv: list[str]) -> int:
    from . import phantom

    p = argparse.ArgumentParser(prog="segreport synth", description="Write the synthetic chest-CT phantom dataset.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=20, help="number of synthetic cases (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same dataset (default: %(default)s)")
    p.add_argument("--shape", type=int, nargs=3, default=(192, 192, 48), metavar=("X", "Y", "Z"),
                   help="volume size in voxels (default: 192 192 48)")
    p.add_argument("--preview", default=None, help="preview PNG path (default: OUT/preview.png)")
    p.add_argument("--slices", choices=("lung", "lesion"), default="lung",
                   help="2D export: every lung slice (default; lesion-free ones read 'No pulmonary infection.') "
                        "or lesion slices only, as MosMedData+")
    a = p.parse_args(argv)
    summary = phantom.generate_dataset(a.out, n_cases=a.cases, seed=a.seed, shape=tuple(a.shape), slice_filter=a.slices)
    preview = a.preview or f"{a.out}/preview.png"
    phantom.render_preview(a.out, preview)
    print(json.dumps(summary, indent=2, default=str))
    print(f"preview: {preview}")
    return 0


def _evaluate(argv: list[str]) -> int:
    from .errors import InputError
    from .inference.evaluate_folder import evaluate_folder

    p = argparse.ArgumentParser(prog="segreport evaluate", description="Score a folder of segreport predictions against labels.")
    p.add_argument("-p", "--predictions", required=True, help="folder with <case>_seg.nii.gz (+ <case>_report.json)")
    p.add_argument("-g", "--ground-truth", required=True, help="folder with <case>.nii.gz labels")
    p.add_argument("--dataset", help="dataset.json (MSD layout) with reference 'text', 'lesions' and 'attributes'")
    p.add_argument("-o", "--output", help="where metrics.json and per_case.csv go (default: the predictions folder)")
    a = p.parse_args(argv)
    try:
        metrics = evaluate_folder(a.predictions, a.ground_truth, a.output, a.dataset)
    except InputError as exc:
        print(f"segreport evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k in ("n_cases", "n_scored", "n_failed", "dice", "hd95_mm")}, indent=2))
    if metrics["n_failed"]:  # missing or unscorable cases: per_case.csv says why; not a clean run
        print(f"segreport evaluate: {metrics['n_failed']} of {metrics['n_cases']} case(s) not scored (see per_case.csv)",
              file=sys.stderr)
        return 1
    return 0


def _bundles(argv: list[str]) -> int:
    from .run.bundles import find_weights, segreport_home, shipped_bundles, shipped_bundles_dir

    p = argparse.ArgumentParser(prog="segreport bundles",
                                description="List the bundles shipped with segreport and where their trained weights are.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    rows = []
    for bundle in shipped_bundles():
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        weights = find_weights(bundle)
        rows.append({"name": bundle.name, "version": meta.get("version"), "path": str(bundle),
                     "weights": weights if os.path.isfile(weights) else None})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<18} {r['version'] or '?':<7} {r['weights'] or 'no trained weights'}")
    print(f"\nbundles: {shipped_bundles_dir() if rows else 'none found'}; weights are looked up in "
          f"<bundle>/models/model.pt, then {segreport_home()}/<bundle>/model.pt ($SEGREPORT_HOME)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"segreport {__version__}")
        return 0
    commands = {"synth", "infer", "evaluate", "label", "bundles", "demo"}
    if not argv or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "synth":
        return _synth(rest)
    if cmd == "infer":
        from .run.infer_cli import main as infer_main

        return infer_main(rest)
    if cmd == "evaluate":
        return _evaluate(rest)
    if cmd == "bundles":
        return _bundles(rest)
    if cmd == "label":
        from .label.server import main as label_main

        return label_main(rest)
    from .demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
