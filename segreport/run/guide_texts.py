"""Where a text-guided model's sentence for each case comes from, in a batch run.

- ``text``: one sentence for every case (``segreport infer --text "..."``);
- ``csv``: a ``case_id,text`` file (``--texts``); a case id may also be the input's file name. Ids
  that match no input case are an error before anything runs (a typo would otherwise leave a case
  without its text); an input case the file does not name fails alone, with that reason;
- ``text_from``: another bundle's predictor writes the finding (``--text-from bundles/medsegtext``):
  the case's finding exactly as that bundle's own report would state it, then the guided model
  segments with it (two bundles chained);
- ``per_case``: a ready ``{case id: sentence}`` (evaluation uses the reference sentences).

The report records the sentence and where it came from (``extras.guide_text_source``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import InputError


class GuideTexts:
    """``for_case(case, loaded) -> (sentence, source)``; see the module docstring."""

    def __init__(self, text: str | None = None, csv_path: str | os.PathLike | None = None, text_from=None,
                 per_case: dict[str, str] | None = None, min_lesion_ml: float | None = None):
        given = [x is not None for x in (text, csv_path, text_from, per_case)]
        if sum(given) != 1:
            raise InputError(None, "give exactly one guide text source: --text, --texts or --text-from")
        self.text, self.text_from, self.per_case, self.source = text, text_from, per_case, None
        self.min_lesion_ml = min_lesion_ml  # None: the text model's own (its spec's)
        if csv_path is not None:
            self.per_case, self.source = read_texts_csv(csv_path), str(csv_path)
        elif per_case is not None:
            self.source = "reference sentences"

    def describe(self) -> str:
        if self.text is not None:
            return "--text (one sentence for every case)"
        if self.text_from is not None:
            return f"findings of {getattr(self.text_from, 'name', 'another model')} ({getattr(self.text_from, 'checkpoint_path', '')})"
        return f"per-case texts from {self.source}"

    def fingerprint(self) -> str:
        """What --resume compares: the sentence, the CSV's content hash, or the source model's checkpoint."""
        import hashlib

        if self.text is not None:
            return f"text:{self.text}"
        if self.text_from is not None:
            return f"from:{getattr(self.text_from, 'checkpoint_path', None)}"
        table = json.dumps(self.per_case, sort_keys=True).encode()
        return f"table:{hashlib.sha256(table).hexdigest()[:16]}"

    def check_cases(self, cases) -> None:
        """Ids of a per-case table that name no input case: one clear error listing them."""
        if self.per_case is None or self.source == "reference sentences":
            return
        known = {c.case_id for c in cases} | {Path(c.path).name for c in cases}
        unknown = sorted(set(self.per_case) - known)
        if unknown:
            raise InputError(self.source, f"texts for unknown case(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''}: "
                                          f"use the input's case ids (file names without .nii.gz) or file names")

    def for_case(self, case, loaded) -> tuple[str, str]:
        if self.text is not None:
            return self.text, "--text"
        if self.per_case is not None:
            text = self.per_case.get(case.case_id, self.per_case.get(Path(case.path).name))
            if text is None:
                raise InputError(self.source, f"no guide text for case {case.case_id}")
            return text, self.source
        return finding_of(self.text_from, case, loaded, self.min_lesion_ml), self.describe()


def read_texts_csv(path: str | os.PathLike) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the texts CSV ({type(exc).__name__}: {exc})") from exc
    if not rows or not {"case_id", "text"} <= set(rows[0]):
        raise InputError(path, "expected a CSV with a header 'case_id,text' and one row per case")
    texts: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        cid = (row.get("case_id") or "").strip()
        if not cid:
            raise InputError(path, f"line {i}: empty case_id")
        if cid in texts:
            raise InputError(path, f"line {i}: case {cid} is listed twice")
        texts[cid] = row.get("text") or ""
    return texts


def finding_of(predictor, case, loaded, min_lesion_ml: float | None = None) -> str:
    """The case finding another bundle's predictor states (its report's ``finding``, after the same
    minimum lesion size the batch applies)."""
    from ..inference.predictor import min_lesion_ml_of
    from ..transforms.postprocess import remove_small_lesions
    from .report import build_report

    prediction = predictor.predict(loaded.image, loaded.affine, lung=loaded.lung)
    prediction.mask = remove_small_lesions(prediction.mask, loaded.affine, min_lesion_ml_of(predictor, min_lesion_ml))
    report = build_report(prediction, loaded.image, loaded.affine, case_id=case.case_id, lung=loaded.lung,
                          zone_map=loaded.zones)
    return report["finding"]
