"""The residual U-Net variant of LesionPromptNet (the 3D bundle's default) and its attribute features:
cached-encoder equivalence, prompt maps, gradients, lesion descriptors measured on phantom lesions,
gradient normalisation and the λ warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segreport.losses.lesion_report import LesionReportLoss
from segreport.models.lesion_report_3d import RETIRED_SWITCHES, build_network, spec_for
from segreport.models.spec import build_network as build_from_spec
from segreport.networks.blocks.gradient_balance import GradientBalance
from segreport.networks.blocks import lesion_features
from segreport.networks.blocks.lesion_features import DESCRIPTOR_NAMES, image_maps, lesion_descriptors
from segreport.networks.blocks.residual_unet import PointwiseConv3d, PromptPyramid, prompt_maps
from segreport.networks.lesion_prompt import LesionPromptNet
from segreport.vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES

ROI = (32, 32, 32)
POINTS = torch.tensor([[[10.0, 12, 14], [20, 20, 20], [3, 4, 5]], [[5, 5, 5], [0, 0, 0], [0, 0, 0]]])
LABELS = torch.tensor([[1, 0, 1], [1, -1, -1]])


def _net(**kw) -> LesionPromptNet:
    torch.manual_seed(0)
    return LesionPromptNet.tiny(backbone="resunet", lesion_pooling=True, **kw).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 1, *ROI)


def test_cached_encoder_gives_the_same_outputs_as_forward(image):
    net = _net()
    with torch.no_grad():
        full = net(image, POINTS, LABELS)
        embedding = net.encode_image(image)
        split = net.decode(embedding, POINTS, LABELS)
        again = net.decode(embedding, POINTS, LABELS, mask_prompt=split["low_res_logits"])
    # the decoder reads the encoder skips at every resolution; the ROI and its image-only maps (gradient,
    # texture) travel for the descriptors, made once per ROI
    assert [tuple(t.shape[1:]) for t in embedding.high_res] == [(8, 32, 32, 32), (16, 16, 16, 16), (32, 8, 8, 8)]
    assert embedding.grid.shape == (2, 64, 4, 4, 4) and torch.equal(embedding.image, image_maps(image))
    assert torch.equal(embedding.image[:, :1], image)
    for key in ("mask_logits", "low_res_logits", "iou_pred"):
        assert torch.equal(full[key], split[key])
    for group in ATTRIBUTE_NAMES:
        assert torch.equal(full["attr_logits"][group], split["attr_logits"][group])
    assert split["mask_logits"].shape == (2, 1, *ROI)
    assert not torch.equal(again["mask_logits"], split["mask_logits"])  # the previous mask is a prompt


def test_every_parameter_learns_including_the_prompt_paths(image):
    net = _net(attr_gradient="normalised").train()
    target = (torch.rand(2, 1, *ROI) > 0.7).float()
    attrs = torch.tensor([[1, 0, 2, 1, 0], [3, 1, 0, 0, 1]])
    out = net(image, POINTS, LABELS, mask_prompt=torch.randn(2, 1, *ROI))
    LesionReportLoss()(out, target, attrs)[0].backward()
    dead = [n for n, p in net.named_parameters()
            if (p.grad is None or not p.grad.abs().sum() > 0) and n != "prompt_encoder.no_mask_embed.weight"]  # a mask was given
    assert not dead, f"no gradient reached: {dead}"


def test_prompt_maps_put_each_click_in_its_channel():
    maps = prompt_maps(POINTS, LABELS, ROI, mask_prompt=torch.full((2, 1, 16, 16, 16), 3.0))
    assert maps.shape == (2, 3, *ROI)
    assert maps[0, 0, 10, 12, 14] == 1 and maps[0, 0, 3, 4, 5] == 1 and maps[0, 1, 20, 20, 20] == 1
    assert maps[0, 0, 20, 20, 20] < 1e-3 and maps[0, 1, 10, 12, 14] < 1e-3
    # padding clicks are no clicks: sample 1 has one positive click and no negative one
    assert maps[1, 1].max() == 0 and maps[1, 0, 5, 5, 5] == 1 and maps[1, 0, 0, 0, 0] < 1e-3
    assert torch.allclose(maps[:, 2], torch.sigmoid(torch.tensor(3.0)).expand(2, *ROI))
    assert prompt_maps(POINTS[:, :0], LABELS[:, :0], ROI).abs().sum() == 0  # no click, no mask: empty maps


def test_prompt_maps_hold_no_subnormal_floats():
    """A click's Gaussian ball is a product of three 1D factors; far from the click that product is a
    subnormal float, which made every layer reading the maps several times slower. Tails under 1e-8 are
    0, and a very negative previous-mask logit gives 0, not sigmoid's subnormal."""
    size = (32, 32, 32)
    clicks = torch.tensor([[[3.0, 4.0, 5.0], [28.0, 27.0, 26.0]]])
    maps = prompt_maps(clicks, torch.tensor([[1, 0]]), size, mask_prompt=torch.full((1, 1, *size), -95.0))
    subnormal = (maps != 0) & (maps.abs() < torch.finfo(torch.float32).tiny)
    assert not subnormal.any(), f"{int(subnormal.sum())} subnormal values"
    assert maps[0, 0, 3, 4, 5] == 1 and maps[0, 1, 28, 27, 26] == 1 and maps[0, 2].max() == 0
    near = prompt_maps(clicks[:, :1], torch.tensor([[1]]), size)[0, 0, 3, 4, 5 + 4]  # 4 voxels away: kept exactly
    assert torch.isclose(near, torch.exp(torch.tensor(-16 / (2 * 1.5**2))))


def _phantom_rois(phantom_dir):
    """(image, lesion mask, attribute targets) of every lesion of the test phantom, as the bundle crops them."""
    from segreport.training.lesion_report import load_datalists, training_transforms

    lists = load_datalists(phantom_dir, lesions="all", min_lesion_voxels=8)  # every lesion of every split
    tf = training_transforms(32, (3.2, 3.2, 5.0))
    items = [tf(dict(item)) for name in ("training", "validation", "test") for item in lists[name]]
    return (torch.stack([d["image"] for d in items]), torch.stack([d["label"] for d in items]),
            torch.stack([d["attr_target"] for d in items]))


def test_descriptors_measure_what_the_attributes_name(phantom_dir):
    """On the phantom's real lesions (their ground-truth masks), each attribute's own descriptor separates
    its classes: density by the core intensity, invasion by contact with dense tissue, surface by the
    edge ratio, heterogeneity by the core spread."""
    image, mask, attrs = _phantom_rois(phantom_dir)
    desc = lesion_descriptors(image, mask)
    assert desc.shape == (len(image), len(DESCRIPTOR_NAMES)) and torch.isfinite(desc).all()
    col = {name: desc[:, i] for i, name in enumerate(DESCRIPTOR_NAMES)}

    def separates(group, descriptor, high_class):
        y = attrs[:, ATTRIBUTE_NAMES.index(group)]
        hi = y == ATTRIBUTE_GROUPS[group].index(high_class)
        if hi.all() or not hi.any():
            pytest.skip(f"the test phantom has one {group} class only")
        return float(col[descriptor][hi].mean()) > float(col[descriptor][~hi].mean())

    assert separates("density", "core_mean", "hyperdense")
    assert separates("invasion", "tissue_contact", "close relationship with adjacent structures")
    assert separates("surface", "edge_ratio", "ill-defined margin")
    assert separates("heterogeneity", "core_std", "heterogeneous")


@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 9), (1, 1, 2, 1, 3), (1, 1, 32, 32, 32)])
def test_fast_dilation_and_pointwise_conv_equal_their_reference_ops(shape):
    """The click path's exact speed-ups: dilation (shifted maxima) == a -inf padded max-pool at every
    radius, the border and radii past the size included; PointwiseConv3d == Conv3d with its weights."""
    torch.manual_seed(0)
    x = torch.rand(shape)
    for r in (1, 2, 3):
        reference = torch.nn.functional.max_pool3d(torch.nn.functional.pad(x, [r] * 6, value=float("-inf")), 2 * r + 1, stride=1)
        assert torch.equal(lesion_features._dilate(x, r), reference), r
    fast = PointwiseConv3d(shape[1], 4)
    conv = torch.nn.Conv3d(shape[1], 4, kernel_size=1)
    conv.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("full, sizes", [((32, 32, 32), [(4, 4, 4), (8, 8, 8), (16, 16, 16), (32, 32, 32)]),
                                         ((32, 24, 12), [(4, 3, 3), (16, 12, 6)]), ((30, 30, 30), [(10, 10, 10), (15, 15, 15)])])
def test_prompt_pyramid_equals_max_pooling_the_full_maps(full, sizes):
    """Each level of the decoder's prompt pyramid, asked coarsest first as a click asks, is exactly the
    full maps max-pooled to it (levels made from halved levels, or pooled directly when sizes do not halve)."""
    torch.manual_seed(0)
    maps = torch.rand(1, 3, *full)
    pyramid = PromptPyramid(maps)
    for size in sizes:
        factor = [f // s for f, s in zip(full, size)]
        assert torch.equal(pyramid.at(size), torch.nn.functional.max_pool3d(maps, factor, factor)), size


def test_descriptors_of_an_empty_mask_are_finite():
    desc = lesion_descriptors(torch.rand(1, 1, *ROI), torch.zeros(1, 1, *ROI))
    assert torch.isfinite(desc).all()
    assert float(desc[0, DESCRIPTOR_NAMES.index("log_volume")]) == 0


def test_gradient_balance_caps_the_auxiliary_gradient_at_the_main_one():
    balance = GradientBalance(ratio=1.0, momentum=0.0).train()
    x = torch.ones(10, requires_grad=True)
    for _ in range(2):  # the first step records the main gradient's norm, the second is capped by it
        x.grad = None
        main, aux = balance(x)
        (0.01 * main.sum() + 100.0 * aux.sum()).backward()
    main_norm = 0.01 * np.sqrt(10)
    assert float(balance.main_norm) == pytest.approx(main_norm, rel=1e-5)
    aux_part = x.grad - 0.01  # what the auxiliary loss sent into x, after the cap
    assert float(aux_part.norm()) == pytest.approx(main_norm, rel=1e-4)
    balance.eval()
    with torch.no_grad():
        assert balance(x)[1] is x  # identity outside training


def test_lambda_warmup_ramps_the_attribute_weight_during_training():
    loss = LesionReportLoss(lambda_attr=1.0, lambda_warmup=4)
    out = {"attr_logits": {g: torch.zeros(2, n, requires_grad=True) for g, n in
                           {g: len(c) for g, c in ATTRIBUTE_GROUPS.items()}.items()}}
    attrs = torch.zeros(2, 5, dtype=torch.long)
    lams = [float(loss(out, None, attrs)[1]["lambda_attr"]) for _ in range(6)]
    assert lams == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 1.0])
    with torch.no_grad():  # validation does not advance the schedule
        loss(out, None, attrs)
    assert int(loss.steps) == 6


def test_the_spec_rebuilds_the_variant_and_old_specs_the_paper_model():
    net = build_network(backbone="resunet", lesion_pooling=True, attr_gradient="normalised")
    spec = spec_for(net)
    rebuilt = build_from_spec(spec)
    assert rebuilt.backbone == "resunet" and rebuilt.lesion_features is not None and rebuilt.balance_tokens is not None
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    old = {**spec, "network": {**spec["network"], "args": {k: v for k, v in spec["network"]["args"].items()
                                                          if k not in ("backbone", "lesion_pooling", "attr_gradient")}}}
    paper = build_from_spec(old)
    assert paper.backbone == "vit" and paper.lesion_features is None and paper.balance_tokens is None


def test_batch_one_convolutions_equal_pytorchs_and_the_model_answers_alike_at_batch_one_and_two():
    """The oneDNN batch-1 Conv3d and the patch-writing ConvTranspose3d give PyTorch's own numbers (same
    weights), and the whole model's batch-1 answer equals that sample's answer inside a batch of 2 (which
    PyTorch itself runs through oneDNN)."""
    from segreport.networks.blocks.cpu_convs import OneDNNConv3d, PatchConvTranspose3d

    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 10, 11)
    for kwargs in ({"kernel_size": 3, "padding": 1}, {"kernel_size": 3, "stride": 2, "bias": False}, {"kernel_size": (3, 1, 3), "dilation": 2, "groups": 2}):
        ref = torch.nn.Conv3d(4, 6, **kwargs)
        fast = OneDNNConv3d(4, 6, **kwargs)
        fast.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    for k in (2, (2, 2, 1)):
        ref = torch.nn.ConvTranspose3d(4, 3, kernel_size=k, stride=k)
        fast = PatchConvTranspose3d(4, 3, kernel_size=k, stride=k)
        fast.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    net = LesionPromptNet.tiny(img_size=(32, 32, 32), backbone="resunet").eval()
    assert not any(type(m) in (torch.nn.Conv3d, torch.nn.ConvTranspose3d) for m in net.modules())
    image = torch.rand(2, 1, 32, 32, 32)
    points, labels = torch.tensor([[[16.0, 16.0, 16.0]]] * 2), torch.ones(2, 1, dtype=torch.long)
    with torch.inference_mode():
        both = net(image, points, labels)["mask_logits"]
        one = net(image[:1], points[:1], labels[:1])["mask_logits"]
    torch.testing.assert_close(one, both[:1], atol=1e-4, rtol=1e-4)


def test_specs_with_retired_switches_rebuild_at_the_kept_value_and_are_refused_otherwise():
    """Checkpoints written before the dropped switches left the network carry them in their spec: at the
    value the network kept they rebuild the same model; asking for the dropped behaviour is a clear error."""
    spec = spec_for(build_network(backbone="resunet", lesion_pooling=True, attr_gradient="normalised"))
    for key in RETIRED_SWITCHES:
        assert key not in spec["network"]["args"]
    old = {**spec, "network": {**spec["network"], "args": {**spec["network"]["args"], "click_affinity": False,
                                                           "full_res_conv": None, "high_res_features": True}}}
    assert build_from_spec(old).state_dict().keys() == build_from_spec(spec).state_dict().keys()  # U-Net: high_res unused
    for key, value in (("click_affinity", True), ("full_res_conv", "dense")):
        bad = {**spec, "network": {**spec["network"], "args": {**spec["network"]["args"], key: value}}}
        with pytest.raises(ValueError, match=f"{key}=.*measured and dropped"):
            build_from_spec(bad)
    vit = spec_for(build_network(backbone="vit"))
    vit["network"]["args"]["high_res_features"] = True
    with pytest.raises(ValueError, match="high_res_features"):
        build_from_spec(vit)
