"""LesionPromptNet (seed 001): shapes, encode/decode split, gradients, K-means refinement, ablation flags,
mask prompt, loss, baselines and a single-sample overfit. Tiny configuration (32³ ROI, 32 wide, 2 layers)."""

from __future__ import annotations

import pytest
import torch

from segreport.losses.lesion_report import LesionReportLoss
from segreport.networks.baselines3d import AttributeCNN, unet_baseline
from segreport.networks.blocks.prompt import kmeans_refine_points
from segreport.networks.blocks.vit3d import WindowedBlock3D
from segreport.networks.lesion_prompt import LesionPromptNet
from segreport.vocab import ATTRIBUTE_NAMES, ATTRIBUTE_NUM_CLASSES

ROI = (32, 32, 32)


def _net(**kw) -> LesionPromptNet:
    torch.manual_seed(0)
    return LesionPromptNet.tiny(**kw).eval()


@pytest.fixture(scope="module")
def net() -> LesionPromptNet:
    return _net()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, *ROI)


def _ellipsoid(center=(14.0, 18.0, 15.0), radii=(6.0, 5.0, 7.0)) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(s)) for s in ROI], indexing="ij"))
    c, r = torch.tensor(center).view(3, 1, 1, 1), torch.tensor(radii).view(3, 1, 1, 1)
    return ((((grid - c) / r) ** 2).sum(0) <= 1).float()[None, None]


def _dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred = (logits > 0).float()
    return float(2 * (pred * target).sum() / (pred.sum() + target.sum()).clamp(min=1))


CLICKS = {
    "none": (None, None),
    "one": (torch.tensor([[[10.0, 12.0, 14.0]], [[20.0, 5.0, 7.0]]]), torch.tensor([[1], [1]])),
    "several+padding": (
        torch.tensor([[[10.0, 12, 14], [20, 20, 20], [3, 4, 5]], [[5, 5, 5], [0, 0, 0], [0, 0, 0]]]),
        torch.tensor([[1, 0, 1], [1, -1, -1]]),
    ),
    "all padding": (torch.zeros(2, 2, 3), torch.full((2, 2), -1)),
}


@pytest.mark.parametrize("clicks", list(CLICKS))
def test_output_shapes(net, image, clicks):
    points, labels = CLICKS[clicks]
    with torch.no_grad():
        out = net(image, points, labels)
    assert out["mask_logits"].shape == (2, 1, *ROI)
    assert out["low_res_logits"].shape == (2, 1, *(4 * g for g in net.grid_size))
    assert out["iou_pred"].shape == (2, 1)
    assert {k: tuple(v.shape) for k, v in out["attr_logits"].items()} == {
        k: (2, n) for k, n in ATTRIBUTE_NUM_CLASSES.items()
    }
    assert all(torch.isfinite(v).all() for v in [out["mask_logits"], out["iou_pred"], *out["attr_logits"].values()])


def test_decode_of_cached_embedding_equals_forward(net, image):
    points, labels = CLICKS["several+padding"]
    with torch.no_grad():
        full = net(image, points, labels)
        embedding = net.encode_image(image)
        split = net.decode(embedding, points, labels)
        # one cached embedding (batch 1) serves several prompt sets
        shared = net.decode(embedding.select(0), points, labels)
        expanded = net.decode(embedding.select(0).expand(2), points, labels)
    assert embedding.grid.shape == (2, 32, *net.grid_size)
    assert embedding.high_res is None  # a ViT has no encoder skips
    for key in ("mask_logits", "low_res_logits", "iou_pred"):
        assert torch.equal(full[key], split[key])
        assert torch.equal(shared[key], expanded[key])
    for group in ATTRIBUTE_NAMES:
        assert torch.equal(full["attr_logits"][group], split["attr_logits"][group])


def test_gradients_reach_encoder_and_every_head(image):
    model = _net().train()
    points, labels = torch.tensor([[[10.0, 12, 14], [20, 20, 20], [0, 0, 0]]] * 2), torch.tensor([[1, 0, -1]] * 2)
    target = (torch.rand(2, 1, *ROI) > 0.7).float()
    attrs = torch.tensor([[1, 0, 2, 1, 0], [3, 1, 0, 0, 1]])
    loss, _ = LesionReportLoss()(model(image, points, labels), target, attrs)
    loss.backward()
    dead = [
        n
        for n, p in model.named_parameters()
        if (p.grad is None or not p.grad.abs().sum() > 0) and not n.startswith("prompt_encoder.mask_downscaling")
    ]
    assert not dead, f"no gradient reached: {dead}"
    # the mask-prompt branch (unused above) trains when a previous mask is given
    model.zero_grad()
    out = model(image, points, labels, mask_prompt=torch.randn(2, 1, *ROI))
    out["mask_logits"].sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.prompt_encoder.mask_downscaling.parameters())


def test_kmeans_picks_points_from_both_planted_clusters():
    """Feature grid split in two at cell x=4; a window around a click on the border spans both halves."""
    torch.manual_seed(0)
    feats = 0.01 * torch.randn(1, 8, 8, 8, 8)
    feats[:, 0, :4] += 1.0
    feats[:, 1, 4:] += 1.0
    points = torch.tensor([[[15.0, 16.0, 16.0], [0.0, 0.0, 0.0]]])  # voxel 15 -> cell 3 (4 voxels/cell)
    labels = torch.tensor([[0, -1]])
    extra, extra_labels = kmeans_refine_points(feats, points, labels, ROI, window=3, k=2, iters=5)
    assert extra.shape == (1, 4, 3) and extra_labels.tolist() == [[0, 0, -1, -1]]
    cells = (extra[0, :2] / 4).floor()  # back to feature cells
    assert sorted((cells[:, 0] >= 4).tolist()) == [False, True]  # one point from each cluster
    assert ((cells[:, 0] - 3).abs() <= 1).all() and ((cells[:, 1:] - 4).abs() <= 1).all()  # inside the window
    assert torch.equal(extra[0, 2:], torch.zeros(2, 3))  # padding click -> padding extras


def test_refinement_adds_k_points_per_real_click(image):
    points, labels = CLICKS["several+padding"]
    with torch.no_grad():
        refined = _net(refine_k=2)(image, points, labels)
        plain = _net(point_refinement=False)(image, points, labels)
    assert torch.equal(plain["point_labels"], labels)
    assert refined["point_labels"].shape == (2, 3 * 3)
    real = (labels != -1).sum(1)
    assert ((refined["point_labels"] != -1).sum(1) == 3 * real).tolist() == [True, True]
    # each extra carries its click's label (clicks first, then k per click in click order)
    assert torch.equal(refined["point_labels"][:, 3:], labels.repeat_interleave(2, dim=1))
    extra = refined["points"][:, 3:][refined["point_labels"][:, 3:] != -1]
    assert ((extra >= 0) & (extra < 32)).all()


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("synergy", [False, True])
def test_ablation_variants_build_and_run(image, refine, synergy):
    model = _net(point_refinement=refine, synergy=synergy)
    assert (model.synergy is not None) == synergy
    with torch.no_grad():
        out = model(image, *CLICKS["one"])
    assert out["mask_logits"].shape == (2, 1, *ROI)


def test_synergy_changes_both_tasks_and_adds_parameters(image):
    on, off = _net(synergy=True), _net(synergy=False)
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("synergy.") for k in unexpected)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(on) - count(off) == count(on.synergy) > 0
    with torch.no_grad():
        a, b = on(image, *CLICKS["one"]), off(image, *CLICKS["one"])
    assert not torch.allclose(a["mask_logits"], b["mask_logits"])  # attributes -> segmentation
    assert not torch.allclose(a["attr_logits"]["shape"], b["attr_logits"]["shape"])  # segmentation -> attributes


def test_mask_prompt_changes_output(net, image):
    points, labels = CLICKS["one"]
    with torch.no_grad():
        embedding = net.encode_image(image)
        first = net.decode(embedding, points, labels)
        second = net.decode(embedding, points, labels, mask_prompt=first["low_res_logits"])
        at_roi_size = net.decode(embedding, points, labels, mask_prompt=first["mask_logits"])
    assert not torch.allclose(first["mask_logits"], second["mask_logits"])
    assert at_roi_size["mask_logits"].shape == (2, 1, *ROI)


def test_multimask_output(image):
    model = _net(num_multimask_outputs=3)
    with torch.no_grad():
        multi = model(image, *CLICKS["one"], multimask_output=True)
        single = model(image, *CLICKS["one"])
    assert multi["mask_logits"].shape == (2, 3, *ROI) and multi["iou_pred"].shape == (2, 3)
    assert single["mask_logits"].shape == (2, 1, *ROI)


def test_windowed_attention_is_local():
    from monai.networks.blocks import TransformerBlock

    torch.manual_seed(0)
    block = TransformerBlock(16, 32, 2, use_flash_attention=True)
    local, glob = WindowedBlock3D(block, (4, 4, 4), window_size=2), WindowedBlock3D(block, (4, 4, 4), 0)
    x = torch.randn(1, 64, 16)
    y = x.clone()
    y[:, 0] += 3 * torch.randn(16)  # token (0,0,0): in the first 2x2x2 window only
    first_window = torch.zeros(4, 4, 4, dtype=torch.bool)
    first_window[:2, :2, :2] = True
    with torch.no_grad():
        changed = (local(x) - local(y)).abs().sum(-1)[0].reshape(4, 4, 4) > 0
        changed_global = (glob(x) - glob(y)).abs().sum(-1)[0] > 0
    assert torch.equal(changed, first_window)
    assert changed_global.all()
    with pytest.raises(ValueError, match="divide"):
        WindowedBlock3D(block, (6, 6, 6), window_size=4)


def test_bad_inputs_raise_clear_errors(net, image):
    with pytest.raises(ValueError, match="img_size"):
        net(torch.zeros(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="labels"):
        net(image, torch.zeros(2, 1, 3), torch.full((2, 1), 2))
    with pytest.raises(ValueError, match="both"):
        net(image, torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="unknown"):
        LesionPromptNet.from_config("huge")
    with pytest.raises(ValueError, match="not made by this model"):  # a cache from another model
        net.decode(_net(backbone="resunet").encode_image(image), *CLICKS["one"])


def test_paper_configuration_builds_on_meta_device():
    with torch.device("meta"):  # no memory, no init cost: checks the wiring of the big configuration
        model = LesionPromptNet.paper()
    assert model.grid_size == (8, 8, 8)
    assert sum(p.numel() for p in model.image_encoder.parameters()) > 80e6  # ViT-B sized


def test_loss_components_ignore_index_and_attribute_formats():
    torch.manual_seed(0)
    logits = {k: torch.randn(3, n) for k, n in ATTRIBUTE_NUM_CLASSES.items()}
    outputs = {"mask_logits": torch.randn(3, 1, 8, 8, 8), "iou_pred": torch.rand(3, 1), "attr_logits": logits}
    mask = (torch.rand(3, 1, 8, 8, 8) > 0.5).float()
    table = torch.tensor([[0, 1, 2, 0, 1], [3, -100, 1, 1, 0], [1, 0, -100, 0, -100]])
    as_dict = {name: table[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}
    loss_fn = LesionReportLoss(lambda_attr=0.5, lambda_bce=1.0, lambda_iou=1.0)
    total, parts = loss_fn(outputs, mask, table)
    total_dict, _ = loss_fn(outputs, mask, as_dict)
    assert torch.allclose(total, total_dict)
    expected_attr = sum(
        torch.nn.functional.cross_entropy(logits[n], as_dict[n], ignore_index=-100) for n in ATTRIBUTE_NAMES
    )
    assert torch.allclose(parts["attr"], expected_attr)
    assert torch.allclose(total, parts["seg"] + 0.5 * parts["attr"] + parts["iou"])
    # a group with no labelled sample is skipped, not NaN; missing attributes -> seg + iou only
    none_labelled = {**as_dict, "shape": torch.full((3,), -100)}
    total_missing, parts_missing = loss_fn(outputs, mask, none_labelled)
    assert torch.isfinite(total_missing) and "attr/shape" not in parts_missing
    seg_only, parts_seg = loss_fn(outputs, mask)
    assert torch.allclose(seg_only, parts_seg["seg"] + parts_seg["iou"])


def test_loss_multimask_keeps_best_mask_and_adaptive_lambda_learns():
    target = torch.zeros(1, 1, 8, 8, 8)
    target[..., 2:6, 2:6, 2:6] = 1
    good, bad = 20 * (target - 0.5), torch.zeros_like(target)
    loss_fn = LesionReportLoss()
    best, _ = loss_fn({"mask_logits": torch.cat([bad, good], 1)}, target)
    only_good, _ = loss_fn({"mask_logits": good}, target)
    assert torch.allclose(best, only_good)
    adaptive = LesionReportLoss(lambda_attr=0.5, adaptive_lambda=True)
    logits = {"shape": torch.randn(2, 4, requires_grad=True)}
    total, parts = adaptive({"attr_logits": logits}, None, {"shape": torch.tensor([0, 3])})
    assert torch.allclose(parts["lambda_attr"], torch.tensor(0.5))
    total.backward()
    assert adaptive.log_var.grad is not None and logits["shape"].grad is not None


def test_baselines_forward_and_share_the_loss():
    torch.manual_seed(0)
    x = torch.randn(2, 1, *ROI)  # BasicUNet halves 4 times; instance norm needs > 1 voxel at the bottom
    unet = unet_baseline(features=(4, 4, 8, 8, 16, 4))
    cnn = AttributeCNN(block_inplanes=(4, 8, 8, 16))
    seg = unet(x)
    attrs = cnn(x)
    assert seg.shape == (2, 1, *ROI)
    assert {k: v.shape[1] for k, v in attrs.items()} == ATTRIBUTE_NUM_CLASSES
    total, parts = LesionReportLoss()(
        {"mask_logits": seg, "attr_logits": attrs}, (x > 1).float(), torch.zeros(2, 5, dtype=torch.long)
    )
    total.backward()
    assert parts["attr"] > 0 and cnn.heads["surface"].weight.grad is not None


def test_tiny_model_overfits_one_sample():
    """Segmentation learns from one click in a few dozen steps (early stop at Dice 0.8)."""
    mask = _ellipsoid()
    torch.manual_seed(1)
    image = mask + 0.3 * torch.randn(1, 1, *ROI)
    points, labels = torch.tensor([[[14.0, 18.0, 15.0]]]), torch.tensor([[1]])
    model = _net().train()
    loss_fn = LesionReportLoss(lambda_bce=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = _dice(model(image, points, labels)["mask_logits"], mask)
    for _ in range(80):
        out = model(image, points, labels)
        loss, _ = loss_fn(out, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dice = _dice(out["mask_logits"].detach(), mask)
        if dice > 0.8:
            break
    assert start < 0.1 and dice > 0.7, (start, dice)
