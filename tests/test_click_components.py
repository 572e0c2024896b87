"""The clicked lesion, not every lesion-like region: ``click_components`` keeps the connected components of
the mask that a positive click touches (on the phantom's own lesion instance maps), and the promptable
model uses it for its output and its attribute pooling, but not for its training loss."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from segreport.models.lesion_report_3d import build_network, spec_for
from segreport.models.spec import build_network as build_from_spec
from segreport.networks.blocks.click_components import DROPPED_LOGIT, clicked_components, keep_clicked
from segreport.inference.geometry import interior_voxel


def _phantom_instances(phantom_dir) -> np.ndarray:
    """The instance map of the phantom case with the most lesions (its own voxel order)."""
    maps = [np.asarray(nib.load(str(p)).dataobj).astype(int) for p in sorted((phantom_dir / "lesionsTr").glob("*.nii.gz"))]
    return max(maps, key=lambda m: len(np.unique(m)))


def _interior(region: np.ndarray) -> list[float]:
    return [float(v) for v in interior_voxel(region)]  # a phantom lesion is one component


def test_a_click_keeps_its_lesion_and_drops_the_others_on_the_phantoms_instance_map(phantom_dir):
    inst = _phantom_instances(phantom_dir)
    ids = [i for i in np.unique(inst) if i]
    assert len(ids) >= 2
    logits = torch.from_numpy(np.where(inst > 0, 4.0, -4.0)).float()[None, None]
    target = ids[-1]
    click = torch.tensor([[_interior(inst == target)]])
    keep = clicked_components(logits, click, torch.tensor([[1]]))[0, 0].numpy()
    lesion = inst == target
    # the clicked lesion and the background (its soft edge); no voxel of another lesion
    assert np.array_equal(keep, (inst == 0) | lesion)
    kept = keep_clicked(logits, torch.from_numpy(keep)[None, None])
    assert torch.equal(kept[0, 0][torch.from_numpy(lesion)], logits[0, 0][torch.from_numpy(lesion)])
    assert kept[0, 0][torch.from_numpy((inst > 0) & ~lesion)].max() <= DROPPED_LOGIT
    # two positive clicks keep both lesions; a negative click keeps nothing by itself
    both = torch.tensor([[_interior(inst == target), _interior(inst == ids[0])]])
    keep2 = clicked_components(logits, both, torch.tensor([[1, 1]]))[0, 0].numpy()
    assert np.array_equal(keep2 & (inst > 0), (inst == target) | (inst == ids[0]))
    assert clicked_components(logits, both, torch.tensor([[1, 0]]))[0, 0].numpy()[inst == ids[0]].sum() == 0


def test_a_click_that_misses_the_mask_keeps_no_component_and_no_positive_click_keeps_all():
    logits = torch.full((2, 1, 12, 12, 12), -3.0)
    logits[:, :, 2:5, 2:5, 2:5] = 3.0
    logits[:, :, 8:11, 8:11, 8:11] = 3.0
    points = torch.tensor([[[6.0, 6, 6], [3, 3, 3]], [[3.0, 3, 3], [0, 0, 0]]])
    keep = clicked_components(logits, points, torch.tensor([[1, -1], [0, -1]]))  # a miss; a negative click only
    assert not keep[0][logits[0] > 0].any() and keep[0][logits[0] <= 0].all()
    assert keep[1].all()
    # a click one voxel beside a component counts (``reach``), two voxels beside it does not
    one = logits[:1]
    beside = clicked_components(one, torch.tensor([[[5.0, 3, 3]]]), torch.tensor([[1]]))[0, 0]
    assert beside[3, 3, 3] and not beside[9, 9, 9]
    assert not clicked_components(one, torch.tensor([[[6.0, 3, 3]]]), torch.tensor([[1]]))[one > 0].any()


@pytest.fixture(scope="module")
def two_blob_roi() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    roi = torch.rand(1, 1, 32, 32, 32) * 0.1 + 0.2
    roi[..., 4:12, 4:12, 4:12] = 0.9
    roi[..., 20:28, 20:28, 20:28] = 0.9
    return roi, torch.tensor([[[8.0, 8, 8]]])


def test_the_model_returns_the_clicked_lesion_but_its_loss_trains_every_voxel(two_blob_roi):
    roi, click = two_blob_roi
    torch.manual_seed(0)
    net = build_network(backbone="resunet", lesion_pooling=True, attr_gradient="normalised", click_components=True)
    plain = build_network(backbone="resunet", lesion_pooling=True, attr_gradient="normalised")
    labels = torch.tensor([[1]])
    with torch.no_grad():  # the hypernetwork's part of the mask is 0: the conv head's (fixed below) is all of it
        for mlp in net.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_(), mlp.layers[-1].bias.zero_()
        plain.load_state_dict(net.state_dict())
    blobs = (roi[0, 0] > 0.5)
    net.eval(), plain.eval()
    raw_logits = torch.where(blobs, 5.0, -5.0)[None, None]

    # both models' masks are these logits (both blobs): the test is of the wiring, not of untrained weights
    def fixed(module, inputs, output):
        return output * 0 + raw_logits

    for m in (net, plain):
        m.conv_head.register_forward_hook(fixed)
    with torch.no_grad():
        out, ref = net(roi, click, labels), plain(roi, click, labels)
    first, second = torch.zeros_like(blobs), torch.zeros_like(blobs)
    first[4:12, 4:12, 4:12], second[20:28, 20:28, 20:28] = True, True
    assert (out["mask_logits"][0, 0][first] > 0).all() and (out["mask_logits"][0, 0][second] <= DROPPED_LOGIT).all()
    assert (ref["mask_logits"][0, 0][second] > 0).all()
    assert not torch.allclose(out["attr_logits"]["shape"], ref["attr_logits"]["shape"])  # the head pooled one blob
    # with gradient, in training: the loss sees the whole mask, the attribute head still the clicked lesion
    net.train(), plain.train()
    out_t, ref_t = net(roi, click, labels), plain(roi, click, labels)
    assert torch.equal(out_t["mask_logits"], ref_t["mask_logits"]) and (out_t["mask_logits"][0, 0][second] > 0).all()
    assert not torch.allclose(out_t["attr_logits"]["shape"], ref_t["attr_logits"]["shape"])
    rebuilt = build_from_spec(spec_for(net))
    assert rebuilt.click_components and not build_from_spec(spec_for(plain)).click_components
