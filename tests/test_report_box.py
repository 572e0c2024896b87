"""A click's report rebuilt on the mask's box (issue 34, MONAI Label latency) is the full report, field for
field: on phantom cases stored LPS, for single lesions, lesions leaking over the pleura (their nearest lung
zone), several lesions at once, attribute anchors inside and outside them; lesions outside the lungs take the
full path."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from segreport.inference.predictor import LesionAttributes, Prediction
from segreport.run.cases import Case, load_case
from segreport.run.report import build_report
from segreport.run.report_box import image_context, report_on_box


def _without_time(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "created"}


def _masks(label: np.ndarray, lung: np.ndarray):
    """(name, mask, attribute anchors) a click could return on this case."""
    components, n = ndimage.label(label > 0)
    for c in range(1, n + 1):
        one = components == c
        inside = tuple(int(v) for v in np.argwhere(one)[len(np.argwhere(one)) // 2])
        yield f"lesion {c}", one, [inside]
        grown = ndimage.binary_dilation(one, iterations=2)  # a predicted mask leaks over the pleura
        yield f"lesion {c} grown", grown, [inside, (0, 0, 0)]
    if n > 1:
        yield "all lesions", label > 0, []


def test_the_report_on_the_box_is_the_full_report(phantom_dir):
    used = 0
    for image_path in sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[:4]:
        loaded = load_case(Case(image_path.name.split(".")[0], str(image_path)))
        label = np.asarray(nib.load(phantom_dir / "labelsTr" / image_path.name).dataobj)
        context = image_context(loaded.image, loaded.affine, loaded.lung, loaded.zones)
        for name, mask, anchors in _masks(label, loaded.lung):
            attributes = [LesionAttributes(a, {"density": {"label": "hypodense", "prob": 0.9}}) for a in anchors]
            kwargs = dict(case_id="c", lung=loaded.lung, zone_map=loaded.zones, model="m")
            full = build_report(Prediction(mask=mask.astype(np.uint8), lesion_attributes=attributes), loaded.image,
                                loaded.affine, **kwargs)
            boxed = report_on_box(Prediction(mask=mask.astype(np.uint8), lesion_attributes=attributes), loaded.image,
                                  loaded.affine, context, **kwargs)
            if boxed is None:  # only what needs the whole image goes the full way
                in_zones_box = np.zeros(mask.shape, bool)
                in_zones_box[context.zones_box] = True
                assert full["lesions_outside_lungs"] or (mask & ~in_zones_box).any(), name
                continue
            used += 1
            assert _without_time(boxed) == _without_time(full), (image_path.name, name)
    assert used >= 10


def test_a_lesion_outside_the_lungs_takes_the_full_path(phantom_dir):
    image_path = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    loaded = load_case(Case("c", str(image_path)))
    body = (loaded.image > -200) & ~ndimage.binary_dilation(loaded.lung > 0, iterations=3)
    centre = np.argwhere(body)[len(np.argwhere(body)) // 2]
    mask = np.zeros(loaded.image.shape, np.uint8)
    mask[tuple(slice(c - 1, c + 2) for c in centre)] = 1
    context = image_context(loaded.image, loaded.affine, loaded.lung, loaded.zones)
    assert report_on_box(Prediction(mask=mask), loaded.image, loaded.affine, context, case_id="c", lung=loaded.lung,
                         zone_map=loaded.zones) is None


def test_an_empty_mask_takes_the_full_path(phantom_dir):
    image_path = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    loaded = load_case(Case("c", str(image_path)))
    context = image_context(loaded.image, loaded.affine, loaded.lung, loaded.zones)
    mask = np.zeros(loaded.image.shape, np.uint8)
    assert report_on_box(Prediction(mask=mask), loaded.image, loaded.affine, context, case_id="c", lung=loaded.lung,
                         zone_map=loaded.zones) is None
