"""The one click parser: a points.json entry, a MONAI Label request and the prompt session read clicks
through it, so the same bad click is refused the same way on every path."""

from __future__ import annotations

import numpy as np
import pytest

from segreport.errors import InputError
from segreport.inference.clicks import MAX_CLICKS, parse_clicks
from segreport.label.tasks import BadRequest, request_clicks
from segreport.run.cases import Case, case_points

AFFINE = np.diag([-0.7, -0.7, 2.5, 1.0])  # LPS-stored voxels, as a DICOM series
SHAPE = (40, 44, 20)


def test_world_clicks_map_through_the_affine_and_round_trip():
    ijk = np.array([[3.0, 40.0, 7.0], [12.0, 5.0, 19.0]])
    world = (np.c_[ijk, np.ones(2)] @ AFFINE.T)[:, :3]
    got, labels = parse_clicks(world.tolist(), [1, 0], world=True, affine=AFFINE, shape=SHAPE)
    np.testing.assert_allclose(got, ijk, atol=1e-9)
    assert labels == [1, 0]
    points, point_labels = case_points(Case("c", "/x/c.nii.gz"), {"c": {"points_world": world.tolist(), "labels": [1, 0]}},
                                       AFFINE, SHAPE, "points.json")
    assert points == ijk.astype(int).tolist() and point_labels == [1, 0]


@pytest.mark.parametrize("points, labels, words", [
    ([[1, 2]], None, "three numbers"),
    ([[1, 2, float("nan")]], None, "finite"),
    ([[1, 2, True]], None, "three numbers"),
    ({"i": 1}, None, "list of"),
    ([[1, 2, 3]], [2], "labels must be one 1"),
    ([[1, 2, 3], [4, 5, 6]], [1], "labels must be one 1"),
    ([[40, 2, 3]], None, r"click point \[40.0, 2.0, 3.0\] lies outside the image of shape \(40, 44, 20\)"),
    ([[1, 2, 3]] * (MAX_CLICKS + 1), None, "at most"),
])
def test_a_bad_click_is_refused_alike_on_every_path(points, labels, words):
    with pytest.raises(InputError, match=words):
        parse_clicks(points, labels, shape=SHAPE, source="points.json")
    entry = {"points": points, **({} if labels is None else {"labels": labels})}
    with pytest.raises(InputError, match=words) as batch_error:
        case_points(Case("c", "/x/c.nii.gz"), {"c": entry}, AFFINE, SHAPE, "points.json")
    assert batch_error.value.path == "points.json" and "case c" in batch_error.value.problem
    if "outside" not in words:  # a request is checked before its image is read; the session checks the bounds
        request = {"points": points, **({} if labels is None else {"point_labels": labels})}
        with pytest.raises(BadRequest, match=words):
            request_clicks(request)


def test_slicer_lists_keep_their_labels_and_ohif_its_order():
    clicks, ordered = request_clicks({"foreground": [[1, 2, 3]], "background": [[4, 5, 6]]})
    assert clicks == [((1.0, 2.0, 3.0), 1), ((4.0, 5.0, 6.0), 0)] and not ordered
    clicks, ordered = request_clicks({"points": [[4, 5, 6], [1, 2, 3]], "point_labels": [0, 1]})
    assert clicks == [((4.0, 5.0, 6.0), 0), ((1.0, 2.0, 3.0), 1)] and ordered
