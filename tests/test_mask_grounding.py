"""MedSegText's text grounding: lesion regions of a mask, the slice level, and that the sentence reads them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from segreport.data.slice_folder import read_slice_folder
from segreport.networks import MedSegText
from segreport.networks.blocks.mask_grounding import body_midline, mask_regions
from segreport.training.slice_sentences import describe_slices, slice_finding
from segreport.transforms.lung_regions import lung_label_from_lobes, slice_levels
from segreport.transforms.slicing import axial_axis

VOCAB, PAD, BOS, EOS = 12, 0, 1, 2


@pytest.fixture(scope="module")
def real_slices(shared_data):
    root = shared_data / "covid19_ct_seg_slices"
    items = read_slice_folder(root, cases={"cc02"})[::6]
    return describe_slices(items)


def test_regions_are_the_components_the_finding_counts_on_real_slices(real_slices):
    checked = 0
    for item in real_slices:
        image = torch.as_tensor(item["image"], dtype=torch.float32)[None] / 255.0
        label = torch.as_tensor(item["label"] > 127, dtype=torch.float32)[None]
        weights, geometry = mask_regions(label, image, max_regions=8, min_fraction=1e-3)
        filled = weights.flatten(2).sum(-1)[0] > 0
        found = slice_finding(label[0, 0].numpy(), item["lung_zones"][0])
        assert int(filled.sum()) == min(found.n_areas, 8), item["file"]
        sizes = geometry[0, filled, 3]
        assert torch.all(sizes[:-1] >= sizes[1:])  # largest first
        torch.testing.assert_close(weights[0, filled].sum((-2, -1)), torch.ones(int(filled.sum())))
        # the midline offset's sign is the image side: radiological display, patient right on the left
        for slot in np.flatnonzero(filled.numpy()):
            region = weights[0, slot] > 0
            col = float(torch.nonzero(region)[:, 1].float().mean())
            assert (geometry[0, slot, 2] < 0) == (col < body_midline(image[0, 0].numpy()))
        checked += int(filled.sum())
    assert checked >= 10  # the case has lesions on many of these slices


def test_slice_levels_follow_world_z_on_a_real_ct_in_any_storage_order(shared_data):
    ts = shared_data / "totalsegmentator"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    lung = lung_label_from_lobes(np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj))
    levels = slice_levels(lung, img.affine)
    axis = axial_axis(img.affine)
    has_lung = lung.any(axis=tuple(a for a in range(3) if a != axis))
    assert np.isfinite(levels[has_lung]).all() and np.nanmin(levels) == 0.0 and np.nanmax(levels) == 1.0
    z_step = np.sign(img.affine[2, axis])
    assert np.all(np.diff(levels[has_lung]) * z_step > 0)  # cranial is higher
    # the same anatomy stored with the axial axis reversed: the same level at the same place
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1, lung.shape[axis] - 1
    flipped = slice_levels(np.flip(lung, axis), img.affine @ flip)
    np.testing.assert_allclose(flipped[::-1], levels)
    assert np.isnan(slice_levels(np.zeros_like(lung), img.affine)).all()


def test_the_joint_models_sentence_reads_the_mask_and_the_level():
    torch.manual_seed(0)
    model = MedSegText.tiny(VOCAB, PAD, BOS, EOS).eval()
    image = torch.rand(2, 1, 64, 64)
    tokens = torch.tensor([[BOS, 5, 6, 7]] * 2)
    left, right = torch.zeros(2, 1, 64, 64), torch.zeros(2, 1, 64, 64)
    left[..., 20:30, 10:20], right[..., 20:30, 44:54] = 1, 1
    level = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        logits = {name: model(image, tokens, mask=m, level=level)["text_logits"]
                  for name, m in (("l", left), ("r", right))}
        assert not torch.allclose(logits["l"], logits["r"])
        moved = model(image, tokens, mask=left, level=level.flip(0))["text_logits"]
        assert not torch.allclose(moved, logits["l"])
        # an unknown level (None or NaN) is one learned token, the same for both
        unknown = model(image, tokens, mask=left)["text_logits"]
        torch.testing.assert_close(model(image, tokens, mask=left, level=torch.full((2,), float("nan")))["text_logits"],
                                   unknown)
        # at inference the sentence describes the model's own mask at the threshold
        own = (torch.sigmoid(model(image)["seg_logits"]) > 0.5).float()
        torch.testing.assert_close(model(image, tokens, level=level)["text_logits"],
                                   model(image, tokens, mask=own, level=level)["text_logits"])


def test_slice_wise_inference_gives_each_slice_its_level(shared_data):
    """The 3D path: a model that takes levels gets, for each axial slice, the level of that slice."""
    from segreport.inference.slicewise import SliceWisePredictor

    ts = shared_data / "totalsegmentator"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    lung = lung_label_from_lobes(np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj))
    axis = axial_axis(img.affine)
    # each file slice k is filled with its own HU (rising with k), so the forward can tell which slice it sees
    shape = [1, 1, 1]
    shape[axis] = lung.shape[axis]
    ct = np.broadcast_to((-1000.0 + 20.0 * np.arange(lung.shape[axis])).reshape(shape), lung.shape).astype(np.float32)
    seen_levels, seen_values = [], []

    def forward(images, level=None):
        seen_levels.append(level.clone())
        seen_values.append(images.mean((1, 2, 3)))
        return {"seg_logits": torch.full((len(images), 1, *images.shape[-2:]), -10.0)}

    predictor = SliceWisePredictor("levels", forward, image_size=32, batch_size=7, takes_levels=True)
    predictor.predict(ct, img.affine, lung=lung)
    file_slice = np.argsort(np.argsort(torch.cat(seen_values).numpy()))  # rank of the slice's value = its index
    given = torch.cat(seen_levels).numpy()
    expected = slice_levels(lung, img.affine)
    np.testing.assert_allclose(given, expected[file_slice])
    assert np.isfinite(given).sum() >= 10
