"""``segreport infer``: the command line over :func:`segreport.run.batch.run_batch`.

Everything that can stop a run is checked before the model loads, and reported with its root cause and
exit code 2: the input (found, readable clicks), the output folder (a folder, writable, not the input
nor inside it, no finished outputs without --overwrite/--resume, no other run writing to it), the
device (``--device cuda`` without a GPU) and the bundle's checkpoint. Exit codes: 0 every case ok (or
skipped by --resume); 1 at least one case failed (the others' outputs are complete; see summary.csv);
2 the run could not start.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError
from . import distributed
from .batch import run_batch
from .bundles import BundleError, load_bundle_predictor  # noqa: F401  (the CLI's and tests' name)
from .outputs import CannotStartError, OutputExistsError, plan_run  # noqa: F401  (OutputExistsError: re-exported)
from .cases import OUTPUT_TYPES
from .guide_texts import GuideTexts
from .run_lock import RunLockedError
from ..vocab import MIN_LESION_ML


def check_device(device: str | None) -> None:
    if device and str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise CannotStartError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}, "
                                   f"CUDA build {torch.version.cuda}); use --device cpu")
        index = str(device).partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise CannotStartError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def guide_texts(args, device: str | None, min_lesion_ml: float | None) -> GuideTexts | None:
    """The --text / --texts / --text-from choice (none: None); --text-from loads that bundle's predictor."""
    if args.text_from and Path(args.text_from).is_file():  # a checkpoint rather than a bundle folder
        from ..models import load

        return GuideTexts(text_from=load(args.text_from, device=device or "cpu"), min_lesion_ml=min_lesion_ml)
    if args.text_from:
        source, _ = load_bundle_predictor(args.text_from, None, device, args.bf16)
        return GuideTexts(text_from=source, min_lesion_ml=min_lesion_ml)
    if args.texts:
        return GuideTexts(csv_path=args.texts)
    return GuideTexts(text=args.text) if args.text is not None else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segreport infer",
        description="Segment and report every CT in INPUT with a bundle's model (loaded once).",
        epilog="Exit status: 0 all cases ok, 1 some case failed (see OUTPUT_DIR/summary.csv), 2 the run "
               "could not start. Under torchrun the cases are sharded over the processes.",
    )
    p.add_argument("--bundle", required=True, help="a bundle shipped with segreport by name (medsegtext, lesion_report_3d, tmc, lapft; "
                                              "`segreport bundles` lists them) or a bundle folder (reads configs/inference.json)")
    p.add_argument("-i", "--input", required=True, help="NIfTI file, folder of .nii/.nii.gz (recursive), or DICOM folder")
    p.add_argument("-o", "--output", required=True, help="OUTPUT_DIR; nothing is written outside it")
    p.add_argument("--checkpoint", help="model weights (default: the bundle's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the bundle's; under torchrun cuda -> cuda:LOCAL_RANK)")
    p.add_argument("--points", help='clicks: {"<case id or file name>": {"points": [[i,j,k],...], "labels": [1,0,...]}} '
                                    '(IJK voxels; or "points_world" in RAS mm)')
    p.add_argument("--output-type", choices=OUTPUT_TYPES, default="nifti",
                   help="masks as NIfTI (default), as a DICOM SEG (one segment per lesion) + DICOM SR (TID 1500 "
                        "measurements and finding) referencing the source series (DICOM inputs only), or both")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    group.add_argument("--resume", action="store_true", help="skip cases whose outputs are complete")
    p.add_argument("--workers", type=int, default=1, help="cases loaded ahead in background threads (default 1; 0: none)")
    p.add_argument("--pattern", default="*.nii*", help="file name filter in input folders (default '*.nii*')")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model")
    p.add_argument("--series", help="DICOM SeriesInstanceUID: run only that series (a folder may hold several)")
    p.add_argument("--allow-non-ct", action="store_true",
                   help="run on volumes the CT plausibility checks refuse (not HU, label-like, 8-bit, odd spacing)")
    p.add_argument("--lung-masks", help="folder of your own lung masks, <case id>.nii.gz (1 right/2 left, binary, or "
                                        "TotalSegmentator lobes 10-14), used instead of the HU-threshold lung mask")
    p.add_argument("--allow-no-lungs", action="store_true",
                   help="run the lung-lesion models on scans without (enough) lung: not a chest CT")
    p.add_argument("--min-lesion-ml", type=float, default=None,
                   help=f"predicted components below this many mL are not lesions (default: the checkpoint's, else {MIN_LESION_ML})")
    text = p.add_mutually_exclusive_group()  # the text-guided bundles (tmc): where each case's sentence comes from
    text.add_argument("--text", help="text-guided bundles: one finding sentence for every case")
    text.add_argument("--texts", help="text-guided bundles: CSV with a header case_id,text (case id or file name)")
    text.add_argument("--text-from", metavar="BUNDLE",
                      help="text-guided bundles: another bundle (e.g. bundles/medsegtext) or its checkpoint writes each "
                           "case's finding first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``segreport infer``: see the module docstring (exit codes 0 / 1 / 2)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world_size, local_rank = distributed.dist_env()
    device = args.device
    if world_size > 1:  # one device per process: cuda -> cuda:LOCAL_RANK
        device = distributed.device_for_rank(device or ("cuda" if torch.cuda.is_available() else "cpu"), local_rank)
    output_dir = Path(args.output).absolute()
    min_lesion_ml = args.min_lesion_ml  # None: each checkpoint's own (inference.predictor.min_lesion_ml_of)
    ctx = distributed.DistContext()
    try:
        # cheap checks first, so a wrong path, device or OUTPUT_DIR is reported before the model loads
        check_device(device)
        plan = plan_run(args.input, output_dir, args.pattern, args.overwrite, args.resume, args.points, args.series,
                        args.output_type)
        ctx = distributed.init_distributed(device)
        predictor, bundle_info = load_bundle_predictor(args.bundle, args.checkpoint, device, args.bf16)
        texts = guide_texts(args, device, min_lesion_ml)
        summary = run_batch(
            predictor, args.input, output_dir, overwrite=args.overwrite,
            resume=args.resume, workers=args.workers, pattern=args.pattern, points=args.points, device=device,
            bf16=args.bf16, rank=rank, world_size=world_size, allow_non_ct=args.allow_non_ct,
            min_lesion_ml=min_lesion_ml, texts=texts,
            manifest_extra={"bundle": bundle_info, "command": ["segreport", "infer", *(argv or sys.argv[1:])]},
            progress=not args.no_progress, series_uid=args.series, allow_no_lungs=args.allow_no_lungs,
            lung_masks=args.lung_masks, plan=plan, output_type=args.output_type,
        )
    except (InputError, OutputExistsError, BundleError, CannotStartError, RunLockedError) as exc:
        print(f"segreport infer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; finished cases are kept (--resume goes on)
        print(f"segreport infer: interrupted; finished cases are kept in {output_dir}: rerun with --resume",
              file=sys.stderr)
        return 130
    finally:
        distributed.cleanup(ctx)
    if rank != 0:
        return 0  # rank 0 reports for the whole run
    counts = summary.counts
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped -> {output_dir}")
    n_other = len(json.loads((output_dir / "manifest.json").read_text()).get("skipped_inputs", []))
    if n_other:
        print(f"  {n_other} file(s) under the input are no case (not NIfTI, not DICOM): listed in manifest.json")
    for row in summary.cases:
        if row["status"] == "failed":
            print(f"  FAILED {row['case_id']}: {row['error']}", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
