"""ROI growth and bad clicks in the prompt session: a lesion larger than the model's ROI is followed into
neighbouring ROIs, within a bound, and stops at the image border; a click outside the lungs is flagged,
one on a vessel or on a lesion touching the image border behaves as documented (PromptSession).

The promptable model here is a classic region grower (the component of bright voxels that holds the
positive clicks, inside its ROI): exact, so what is measured is the session's geometry, not a network."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from region_grower import RegionGrower
from segreport.inference.session import PromptSession, click_site
from segreport.metrics.segmentation import dice


def _ct_with_long_lesion(shape=(40, 40, 100), lesion=np.s_[16:24, 16:24, 10:90]):
    """A lung-density box with one 32 × 32 × 320 mm lesion along z (the ROI is 64 mm): 4 mm voxels, RAS."""
    ct = np.full(shape, -850.0, np.float32)
    truth = np.zeros(shape, bool)
    truth[lesion] = True
    ct[truth] = -50.0
    return ct, np.diag([4.0, 4.0, 4.0, 1.0]), truth


def _session(ct, affine, max_rois: int, **grower) -> PromptSession:
    session = PromptSession(RegionGrower(**grower), max_rois=max_rois)
    session.set_image(ct, affine)
    return session


def test_a_lesion_longer_than_the_roi_is_followed_into_new_rois():
    ct, affine, truth = _ct_with_long_lesion()
    cut = _session(ct, affine, max_rois=1).click([20, 20, 50])
    assert cut.extras["rois"] == 1 and "reaches an ROI border" in cut.extras["roi_growth"]
    assert dice(cut.mask > 0, truth) < 0.4  # one 64 mm ROI of a 320 mm lesion

    grown = _session(ct, affine, max_rois=8)
    full = grown.click([20, 20, 50])
    assert full.extras["roi_growth"] == "inside the ROIs" and 1 < full.extras["rois"] <= 8
    assert dice(full.mask > 0, truth) > 0.95 and grown.n_encodes == full.extras["rois"]
    # a further click reuses every ROI's embedding
    again = grown.click([20, 20, 30])
    assert grown.n_encodes == full.extras["rois"] and dice(again.mask > 0, truth) > 0.95


def test_a_further_click_decodes_only_the_rois_it_lies_in():
    """What keeps a click interactive on a lesion spread over several ROIs: the ROIs without a new click keep
    their answer (not decoded, not resampled again); the one that holds the click is decoded with it."""
    ct, affine, truth = _ct_with_long_lesion()
    session = _session(ct, affine, max_rois=8)
    first = session.click([20, 20, 50])
    n_rois = first.extras["rois"]
    decoded = []
    decode = session.network.decode
    session.network.decode = lambda embedding, *args, **kwargs: decoded.append(embedding) or decode(embedding, *args, **kwargs)
    before = {id(t): (t.prob.clone(), t.on_input_grid) for t in session._tiles}
    again = session.click([20, 20, 52], positive=False)  # a negative click next to the first: one ROI holds both
    holding = [t for t in session._tiles if session._inside(t, np.array([20.0, 20.0, 52.0]))]
    assert len(decoded) == len(holding) == 1 and decoded[0] is holding[0].embedding
    for t in session._tiles:
        if t is not holding[0]:
            assert t.on_input_grid is before[id(t)][1] and torch.equal(t.prob, before[id(t)][0])
    assert again.extras["rois"] == n_rois and session.n_encodes == n_rois


def test_growth_stops_at_its_bound_and_at_the_image_border():
    ct, affine, truth = _ct_with_long_lesion()
    part = _session(ct, affine, max_rois=3).click([20, 20, 50])
    assert part.extras["rois"] == 3 and "max_rois 3" in part.extras["roi_growth"]
    assert 0.4 < dice(part.mask > 0, truth) < 0.95

    # a lesion running out of the image: growth ends at the border, nothing is asked beyond it
    ct, affine, truth = _ct_with_long_lesion(lesion=np.s_[16:24, 16:24, 60:100])
    result = _session(ct, affine, max_rois=8).click([20, 20, 90])
    assert result.extras["roi_growth"] == "inside the ROIs" and dice(result.mask > 0, truth) > 0.95
    assert result.mask.shape == ct.shape


def test_a_positive_click_beyond_the_rois_adds_one_within_the_bound():
    """Two separate lesions: a positive click on the second, outside the first click's ROI, gets its own
    ROI while the bound allows; at the bound it is ignored, as a negative click there always is."""
    ct = np.full((40, 40, 100), -850.0, np.float32)
    first, second = np.s_[16:24, 16:24, 20:28], np.s_[16:24, 16:24, 70:78]
    ct[first] = ct[second] = -50.0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    session = _session(ct, affine, max_rois=2)
    session.click([20, 20, 24])
    assert session.n_encodes == 1
    negative = session.click([20, 20, 74], positive=False)
    assert negative.extras["ignored_clicks"][0]["reason"] == "outside the ROI" and session.n_encodes == 1
    both = session.click([20, 20, 74])
    assert session.n_encodes == 2 and both.extras["rois"] == 2
    assert both.mask[first].all() and both.mask[second].all()
    bounded = _session(ct, affine, max_rois=1)
    bounded.click([20, 20, 24])
    one = bounded.click([20, 20, 74])
    assert bounded.n_encodes == 1 and not one.mask[second].any() and one.extras["ignored_clicks"]


def test_a_false_positive_at_the_roi_border_does_not_pull_rois_after_it():
    """Only the clicked lesion grows the ROIs: a separate bright structure running out of the ROI (a
    vessel, or the model's false positive) is in the mask but asks for no neighbour."""
    ct = np.full((40, 40, 100), -850.0, np.float32)
    lesion = np.s_[16:24, 16:24, 46:54]
    ct[lesion] = -50.0
    ct[25:27, 25:27, :] = -50.0  # a long vessel-like structure beside it, in its ROI, through the whole scan
    session = _session(ct, np.diag([4.0, 4.0, 4.0, 1.0]), max_rois=8, false_positives=True)
    result = session.click([20, 20, 50])
    assert result.extras["rois"] == 1 and result.extras["roi_growth"] == "inside the ROIs"
    assert result.mask[lesion].all() and result.mask[25:27, 25:27, 46:54].all()  # the false positive is there
    assert session.n_encodes == 1


def _chest_box():
    """Air outside, a 40 mm soft-tissue wall (as mediastinum or abdomen), lung inside with a 2.4 cm lesion
    against the wall."""
    ct = np.full((50, 50, 50), -1000.0, np.float32)
    ct[2:48, 2:48, 2:48] = 40.0  # body wall
    ct[12:38, 12:38, 12:38] = -850.0  # lung
    ct[12:18, 22:28, 22:28] = -30.0  # a lesion touching the wall
    return ct, np.diag([4.0, 4.0, 4.0, 1.0])


def test_a_click_outside_the_lungs_still_runs_and_is_flagged():
    ct, affine = _chest_box()
    on_lesion = _session(ct, affine, max_rois=1).click([15, 25, 25])
    assert on_lesion.extras["click_warnings"] == [] and on_lesion.mask[12:18, 22:28, 22:28].all()
    wall = _session(ct, affine, max_rois=1).click([4, 25, 25])  # in the wall, 32 mm from the lung
    assert wall.extras["click_warnings"][0]["site"] == "outside the lungs"
    air = _session(ct, affine, max_rois=1).click([1, 1, 1])
    assert air.extras["click_warnings"][0]["site"] == "in air"
    # nothing bright under an air click: an empty mask is reported as such
    assert not air.mask.any() and air.case_finding == "No lesion segmented." and air.lesion_attributes == []


def test_click_sites_on_a_real_ct(shared_data):
    """TotalSegmentator's example CT (3 mm): inside its right lower lobe, in its liver, in the air around it."""
    root = shared_data / "totalsegmentator"
    img = nib.load(root / "example_ct_sm.nii.gz")
    ct, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
    lobe = np.asarray(nib.load(root / "example_seg_fast_lung" / "lung_lower_lobe_right.nii.gz").dataobj) > 0
    liver = np.asarray(nib.load(root / "example_seg_fast.nii.gz").dataobj) == 5
    deepest = [np.unravel_index(ndimage.distance_transform_edt(m).argmax(), m.shape) for m in (lobe, liver)]
    assert click_site(ct, affine, deepest[0])["site"] == "lung"
    assert click_site(ct, affine, deepest[1])["site"] == "outside the lungs"
    assert click_site(ct, affine, (0, 0, 15))["site"] == "in air"


def test_a_click_on_a_vessel_follows_it_only_as_far_as_the_bound():
    """A vessel inside the lung is a lung click (no warning); a model that segments it is followed by ROI
    growth through the scan, but never past ``max_rois``."""
    ct = np.full((40, 40, 100), -850.0, np.float32)
    ct[19:21, 19:21, :] = 40.0  # a vessel through the whole scan
    session = _session(ct, np.diag([4.0, 4.0, 4.0, 1.0]), max_rois=3)
    result = session.click([20, 20, 50])
    assert result.extras["click_warnings"] == [] and result.extras["rois"] == 3
    assert "max_rois 3" in result.extras["roi_growth"] and session.n_encodes == 3


def test_a_lesion_touching_the_image_border_is_segmented_inside_the_image():
    """The ROI centred on a click at the image edge reaches past it (padded as air); the mask comes back on
    the image grid, whole, and growth asks for nothing beyond the border."""
    ct = np.full((40, 40, 40), -850.0, np.float32)
    truth = np.zeros(ct.shape, bool)
    truth[0:6, 0:6, 17:23] = True  # in the corner of the image
    ct[truth] = -50.0
    result = _session(ct, np.diag([4.0, 4.0, 4.0, 1.0]), max_rois=8).click([1, 1, 20])
    assert result.mask.shape == ct.shape and dice(result.mask > 0, truth) > 0.95
    assert result.extras["rois"] == 1 and result.extras["roi_growth"] == "inside the ROIs"
