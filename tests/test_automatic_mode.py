"""The automatic mode of the 3D lesion report (segreport.inference.automatic): every lesion of a scan by a
sliding-window search, each refined through one simulated click. The model is the region grower (exact),
so these check the geometry: the lung bound, candidates, refinement with ROI growth, the instance map,
independence from voxel storage; then a real (untrained) network through the bundle's predictor."""

from __future__ import annotations

import numpy as np
import torch

from region_grower import RegionGrower
from monai.data.utils import dense_patch_slices

from segreport.inference.automatic import SearchSettings
from segreport.inference.session import PromptSession
from segreport.metrics.segmentation import dice

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])  # RAS, 4 mm voxels
LESIONS = {  # name -> box; "long" runs 152 mm along z, the ROI is 64 mm
    "right": np.s_[10:16, 14:20, 14:20],
    "left": np.s_[36:40, 10:14, 30:34],
    "long": np.s_[44:50, 20:26, 6:44],
}


def _chest():
    """Air, a soft-tissue body (bright: one large component outside the lungs), two lung boxes (label 1
    right = low i in RAS, 2 left) holding three lesions away from the walls."""
    ct = np.full((60, 40, 50), -1000.0, np.float32)
    ct[1:59, 1:39, 1:49] = 40.0
    lung = np.zeros(ct.shape, np.uint8)
    lung[4:28, 4:36, 3:47], lung[32:56, 4:36, 3:47] = 1, 2
    ct[lung > 0] = -850.0
    truth = {}
    for name, box in LESIONS.items():
        ct[box] = -50.0
        truth[name] = np.zeros(ct.shape, bool)
        truth[name][box] = True
    return ct, lung, truth


def _find(ct, affine, lung, max_rois=8, **settings):
    session = PromptSession(RegionGrower(), max_rois=max_rois)
    session.set_image(ct, affine)
    return session, session.find_all(lung, SearchSettings(**settings))


def _instances(pred) -> np.ndarray:
    """The prediction's lesions as an instance map: each lesion's component holding its anchor voxel."""
    from scipy import ndimage

    comps, _ = ndimage.label(pred.mask, np.ones((3, 3, 3)))
    out = np.zeros(pred.mask.shape, np.int32)
    for i, les in enumerate(pred.lesion_attributes, 1):
        out[comps == comps[tuple(les.voxel)]] = i
    return out


def test_every_lung_lesion_is_found_whole_and_nothing_outside_the_lungs():
    ct, lung, truth = _chest()
    session, pred = _find(ct, AFFINE, lung)
    assert pred.extras["mode"] == "automatic" and len(pred.lesion_attributes) == 3
    inst = _instances(pred)
    for name, t in truth.items():
        ids = np.unique(inst[t])
        assert len(ids) == 1 and ids[0] > 0, name
        assert dice(inst == ids[0], t) > 0.95, name  # the long one too: ROI growth followed it
    long_id = int(inst[truth["long"]][0])
    assert pred.extras["lesions"][long_id - 1]["rois"] > 1
    assert not pred.mask[ct == 40.0].any()  # the body wall is bright but not in the lungs: no candidate
    assert pred.extras["lesions"][0]["voxels"] == max(int(t.sum()) for t in truth.values())  # largest first
    assert session.clicks == []  # the session ends reset: a person's first click starts clean


def test_the_search_runs_only_over_the_lungs():
    """Given only the right lung, the windows cover its box (+ the margin) and the left lung's lesions,
    outside that box, are not searched."""
    ct, lung, truth = _chest()
    _, both = _find(ct, AFFINE, lung, overlap=0.5)
    _, right = _find(ct, AFFINE, (lung == 1).astype(np.uint8), overlap=0.5)
    roi = (16,) * 3
    box = [max(b - a, r) for (a, b), r in zip(right.extras["search"]["box"], roi)]  # padded up to the ROI
    # MONAI's own enumeration of the box's windows (scan interval int(roi * (1 - overlap)), the whole ROI
    # on an axis as long as it)
    expected = len(dense_patch_slices(box, roi, [r if s == r else int(r * 0.5) for s, r in zip(box, roi)]))
    assert right.extras["windows"] == expected < both.extras["windows"]
    assert len(right.lesion_attributes) == 1 and right.mask[truth["right"]].all() and not right.mask[truth["long"]].any()
    no_lung = _find(ct, AFFINE, np.zeros_like(lung))[1]
    assert no_lung.extras["windows"] == 0 and not no_lung.mask.any() and not no_lung.lesion_attributes


def test_results_do_not_depend_on_how_the_file_stores_its_voxels():
    """The same chest stored flipped along i and with j/k swapped (the affine says so): the same lesions
    at the same world positions."""
    ct, lung, _ = _chest()
    _, pred = _find(ct, AFFINE, lung)
    n = ct.shape[0]
    flip = np.array([[-1, 0, 0, n - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    swap = np.eye(4)[:, [0, 2, 1, 3]]
    stored = lambda a: np.ascontiguousarray(a[::-1].transpose(0, 2, 1))  # noqa: E731
    _, other = _find(stored(ct), AFFINE @ flip @ swap, stored(lung))
    assert len(other.lesion_attributes) == len(pred.lesion_attributes)
    assert np.array_equal(other.mask, stored(pred.mask))


def test_beyond_the_refined_rois_the_window_outline_stands():
    """Without ROI growth the click's ROI sees part of the long lesion; the rest keeps the sliding window's
    outline, so it is still one whole lesion (a diffuse lesion is not split into fragments)."""
    ct, lung, truth = _chest()
    _, pred = _find(ct, AFFINE, lung, max_rois=1)
    inst = _instances(pred)
    long_ids = set(np.unique(inst[truth["long"]])) - {0}
    assert len(long_ids) == 1 and len(pred.lesion_attributes) == 3
    assert dice(inst == long_ids.pop(), truth["long"]) > 0.95
    assert all(les["rois"] == 1 for les in pred.extras["lesions"])


def test_a_lesion_lies_in_one_lung_candidates_and_refinement_stop_at_the_midline():
    """One bright band from the right lung through the mediastinum into the left (what a weak model's
    mask did across diffuse lesions of both lungs): the search's component and the click's grown region
    both cross, and each side becomes its own lesion, apart in the mask (the report's lesions are its
    components). The cut is the patient's midline plane in world x, so a flipped file gives the same."""
    ct, lung, _ = _chest()  # lungs at i 4:28 (right) and 32:56 (left), body at 1:59: midline plane at i = 29.5
    ct[28:32, 4:36, 3:47] = -850.0  # a dark strip between them (outside the lung mask), so the band is its own component
    band = np.zeros(ct.shape, bool)
    band[20:40, 14:20, 14:20] = True
    ct[band] = -50.0
    flip = np.array([[-4.0, 0, 0, 59 * 4.0], [0, 4.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]])
    for affine in (AFFINE, flip):
        _, pred = _find(ct, affine, lung)
        inst = _instances(pred)
        right, left = band & (np.arange(60) < 29)[:, None, None], band & (np.arange(60) > 30)[:, None, None]
        ids = [set(np.unique(inst[side])) for side in (right, left)]
        assert all(len(i) == 1 and 0 not in i for i in ids) and ids[0] != ids[1]  # one lesion per side, whole
        assert not inst[29:31].any() and len(pred.lesion_attributes) == 2 + 3  # + the chest's three


def test_a_speck_keeps_the_windows_outline_and_its_click_gives_the_attributes():
    """A candidate under ``outline_min_ml`` (here a 0.5 mL speck: 2³ voxels of 4 mm) keeps the search's
    outline; its click still runs (attributes). With the bound at 0 the click's outline is taken."""
    ct, lung, _ = _chest()
    ct[20:22, 28:30, 36:38] = -50.0
    for bound, source in ((1.0, "sliding window (under outline_min_ml"), (0.0, "click refinement")):
        _, pred = _find(ct, AFFINE, lung, outline_min_ml=bound)
        speck = next(d for d in pred.extras["lesions"] if d["voxels"] == 8)
        assert speck["source"].startswith(source) and speck["click_ijk"] is not None
        assert pred.lesion_attributes[speck["id"] - 1].attributes is not None


def test_the_candidates_threshold_is_the_searchs_own_when_set():
    """``SearchSettings.threshold`` replaces the model's for the candidates: above the grower's
    probability (sigmoid 8 = 0.99966) nothing is a candidate; unset, the model's 0.5 finds all three."""
    ct, lung, _ = _chest()
    assert _find(ct, AFFINE, lung)[1].extras["candidates"] == 3
    assert _find(ct, AFFINE, lung, threshold=0.9999)[1].extras["candidates"] == 0
    assert _find(ct, AFFINE, lung, threshold=0.9)[1].extras["candidates"] == 3


def test_the_bundle_predictor_runs_a_real_network_automatically(phantom_dir):
    """The default 3D network (untrained, tiny) through the bundle's predictor on a phantom case: no click
    means the automatic mode; every lesion has an anchor inside its mask and attributes."""
    import nibabel as nib

    from segreport.models import lesion_report_3d as lr3d

    torch.manual_seed(0)
    net = lr3d.build_network(backbone="resunet", lesion_pooling=True, attr_gradient="normalised", spacing=[3.2, 3.2, 10.0])
    spec = lr3d.spec_for(net)
    predictor = lr3d.predictor(spec, net.state_dict(), sw_batch_size=2)
    img = nib.load(phantom_dir / "imagesTr" / "case_0000.nii.gz")
    lung = np.asarray(nib.load(phantom_dir / "lungsTr" / "case_0000.nii.gz").dataobj)
    pred = predictor.predict(np.asarray(img.dataobj, np.float32), img.affine, lung=lung)
    assert pred.mask.shape == img.shape and pred.extras["mode"] == "automatic" and pred.extras["windows"] > 0
    for les in pred.lesion_attributes:
        assert pred.mask[tuple(les.voxel)] == 1 and set(les.attributes) == {"shape", "invasion", "density", "heterogeneity", "surface"}
    single = lr3d.predictor(spec, net.state_dict(), automatic=False).predict(np.asarray(img.dataobj, np.float32), img.affine, lung=lung)
    assert "windows" not in single.extras and single.extras["rois"] >= 1  # the one-ROI mode is still there
