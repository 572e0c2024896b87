"""The ``make demo`` job: default data, then each bundle end to end, briefly, on this CPU.

1. generate the synthetic chest-CT phantom and a preview picture;
2. MedSegText: train (tiny configuration), evaluate on the held-out split, infer on one volume;
3. the interactive 3D lesion-report bundle, when present: train briefly, evaluate, infer with a click;
4. TMC: train, evaluate, and infer on the same volume guided by MedSegText's finding (two bundles chained).
Every step goes through the same entry points a user runs (``monai.bundle.run`` with the bundle's
own YAML files, ``run_batch``), so the demo proves those work, not a private shortcut.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .run.bundles import shipped_bundles_dir

BUNDLES = shipped_bundles_dir()


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / n) for n in names]


def _step(title: str):
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _showcase_volume(data_dir: Path) -> Path:
    """A held-out test case with lesions (CT-1..CT-3), so the inference output has something to show."""
    test = json.loads((data_dir / "splits.json").read_text()).get("test", [])
    for case_id in test:
        meta = json.loads((data_dir / "cases" / f"{case_id}.json").read_text())
        if meta["severity"] in ("CT-1", "CT-2", "CT-3"):
            return data_dir / "imagesTr" / f"{case_id}.nii.gz"
    return data_dir / "imagesTr" / f"{test[0] if test else 'case_0000'}.nii.gz"


def run_medsegtext(out: Path, data_dir: Path, epochs: int) -> dict:
    from monai.bundle import run

    bundle_out = out / "medsegtext"
    # weights under the demo folder (a bundle trained for real writes bundles/<name>/models/model.pt)
    common = dict(bundle_root=str(BUNDLES / "medsegtext"), output_dir=str(bundle_out), ckpt_dir=str(bundle_out / "models"),
                  dataset_dir=str(data_dir), num_threads=1)
    t = _step(f"MedSegText: training {epochs} epochs (tiny configuration)")
    run("training", config_file=_configs("medsegtext", "train.yaml"), epochs=epochs, val_interval=epochs, **common)
    print(f"    trained in {time.perf_counter() - t:.0f} s")
    _step("MedSegText: evaluating on the held-out test split")
    run("evaluating", config_file=_configs("medsegtext", "train.yaml", "evaluate.yaml"), **common)
    metrics = json.loads((bundle_out / "eval" / "metrics.json").read_text())["test"]
    _step("MedSegText: inference on one CT volume")
    volume = _showcase_volume(data_dir)
    run("inferring", config_file=_configs("medsegtext", "inference.json"), bundle_root=str(BUNDLES / "medsegtext"),
        output_dir=str(bundle_out), checkpoint=str(bundle_out / "models" / "model.pt"), input_image=str(volume))
    return {"metrics": metrics, "outputs": str(bundle_out), "volume": str(volume)}


def run_lesion_report_3d(out: Path, data_dir: Path, epochs: int) -> dict | None:
    bundle = BUNDLES / "lesion_report_3d"
    if not (bundle / "configs" / "train.yaml").is_file():
        return None
    from monai.bundle import run

    bundle_out = out / "lesion_report_3d"
    # every lesion a target (about four per scan) on a 2.4 x 2.4 x 5 mm grid: in a CPU demo's minutes the model
    # learns to answer a click (the bundle's paper protocol, one largest lesion per scan, did not: Dice 0.14)
    common = dict(bundle_root=str(bundle), output_dir=str(bundle_out), ckpt_dir=str(bundle_out / "models"), dataset_dir=str(data_dir),
                  target_lesions="all", spacing=[2.4, 2.4, 5.0])
    t = _step(f"Interactive 3D lesion report: training {epochs} epochs (tiny configuration, every lesion a target)")
    run("training", config_file=_configs("lesion_report_3d", "train.yaml"), epochs=epochs, **common)
    print(f"    trained in {time.perf_counter() - t:.0f} s")
    _step("Interactive 3D lesion report: evaluating (Dice per click, attributes)")
    run("evaluating", config_file=_configs("lesion_report_3d", "train.yaml", "evaluate.yaml"), **common)
    metrics_file = bundle_out / "eval" / "metrics.json"
    _step("Interactive 3D lesion report: inference on one CT volume (no click: automatic ROI)")
    run("inferring", config_file=_configs("lesion_report_3d", "inference.json"), bundle_root=str(bundle),
        output_dir=str(bundle_out), checkpoint=str(bundle_out / "models" / "model.pt"), input_image=str(_showcase_volume(data_dir)))
    return {"metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None, "outputs": str(bundle_out)}


def run_tmc(out: Path, data_dir: Path, epochs: int, medsegtext_checkpoint: Path, volume: Path) -> dict:
    from monai.bundle import run

    from .models import load
    from .run.batch import run_batch
    from .run.guide_texts import GuideTexts

    bundle_out = out / "tmc"
    common = dict(bundle_root=str(BUNDLES / "tmc"), output_dir=str(bundle_out), ckpt_dir=str(bundle_out / "models"),
                  dataset_dir=str(data_dir), num_threads=1)
    t = _step(f"TMC: training {epochs} epochs (tiny configuration), slices guided by their level's sentence")
    run("training", config_file=_configs("tmc", "train.yaml"), epochs=epochs, **common)
    print(f"    trained in {time.perf_counter() - t:.0f} s")
    _step("TMC: evaluating on the held-out test split (each slice with its reference sentence)")
    run("evaluating", config_file=_configs("tmc", "train.yaml", "evaluate.yaml"), **common)
    _step("TMC: inference on the same CT volume, guided by MedSegText's finding (--text-from)")
    texts = GuideTexts(text_from=load(medsegtext_checkpoint))
    run_batch(load(bundle_out / "models" / "model.pt"), volume, bundle_out / "inference", overwrite=True, texts=texts,
              progress=False)
    return {"metrics": json.loads((bundle_out / "eval" / "metrics.json").read_text())["test"], "outputs": str(bundle_out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segreport demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/demo", help="folder for the phantom, trained weights and results (default: %(default)s)")
    p.add_argument("--cases", type=int, default=24, help="phantom cases to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="phantom and case-split seed (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the 2D bundles (default: %(default)s)")
    p.add_argument("--epochs-3d", type=int, default=20, help="training epochs of the 3D bundle (default: %(default)s)")
    p.add_argument("--skip-3d", action="store_true", help="leave out the 3D lesion-report bundle")
    p.add_argument("--skip-tmc", action="store_true", help="leave out the text-guided TMC bundle")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from . import phantom

    out = Path(a.out).resolve()
    data_dir = out / "phantom"
    t = _step(f"Synthetic chest-CT phantom: {a.cases} cases -> {data_dir}")
    # with lesion-free lung slices, so MedSegText learns "no infection" before it runs over volumes
    summary = phantom.generate_dataset(data_dir, n_cases=a.cases, seed=a.seed, slice_filter="lung")  # as ensure_default
    preview = out / "phantom_preview.png"
    phantom.render_preview(data_dir, preview)
    print(json.dumps(summary, indent=2, default=str)[:1500])
    print(f"    generated in {time.perf_counter() - t:.1f} s; preview: {preview}")

    results = {"phantom": str(data_dir), "preview": str(preview)}
    results["medsegtext"] = run_medsegtext(out, data_dir, a.epochs)
    if not a.skip_3d:
        results["lesion_report_3d"] = run_lesion_report_3d(out, data_dir, a.epochs_3d)
    if not a.skip_tmc:
        mst = results["medsegtext"]
        results["tmc"] = run_tmc(out, data_dir, a.epochs, Path(mst["outputs"]) / "models" / "model.pt", Path(mst["volume"]))

    print("\n=== Done. Where the outputs are:")
    print(f"  phantom dataset:       {data_dir}")
    print(f"  phantom preview:       {preview}")
    m = results["medsegtext"]
    print(f"  MedSegText outputs:    {m['outputs']}  (models/, logs/, eval/metrics.json, eval/panels/, inference/)")
    keys = ("dice_case_mean", "dice_slice_mean", "bleu4", "meteor", "rouge_l")
    print("  MedSegText test split: " + ", ".join(f"{k}={m['metrics'][k]:.3f}" for k in keys if k in m["metrics"]))
    if results.get("lesion_report_3d"):
        r3 = results["lesion_report_3d"]
        print(f"  3D lesion report:      {r3['outputs']}  (models/, eval/, inference/)")
        if r3.get("metrics") and "test" in r3["metrics"]:
            t3 = r3["metrics"]["test"]
            print(f"  3D report test split:  Dice in the ROI from one central click {t3['dice_per_click'][1]:.3f} "
                  f"(target 0.5), 5 clicks {t3['dice_per_click'][min(5, len(t3['dice_per_click']) - 1)]:.3f}, attributes "
                  f"{t3.get('attribute_accuracy_average', float('nan')):.3f}; {t3['n_items']} lesions of {t3['n_cases']} cases")
    if results.get("tmc"):
        tm = results["tmc"]["metrics"]
        print(f"  TMC outputs:           {results['tmc']['outputs']}  (models/, eval/metrics.json, inference/: guided by "
              f"MedSegText's finding); test Dice per case {tm['dice_case_mean']:.3f}, mIoU {tm['miou_case_mean']:.3f}")
    print(f"  use a trained model:   segreport infer --bundle medsegtext --checkpoint {m['outputs']}/models/model.pt -i CT_FOLDER -o OUT")
    (out / "demo_summary.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"  summary:               {out / 'demo_summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
