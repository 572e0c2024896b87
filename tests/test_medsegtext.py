"""MedSegText network, text decoding and joint loss (tiny configuration, CPU, seconds)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from segreport.losses import JointLoss
from segreport.networks import MedSegText
from segreport.networks.blocks import CachedTransformerDecoderLayer, ConvNeXtEncoder

VOCAB, PAD, BOS, EOS = 12, 0, 1, 2
TINY_ENCODER = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))


def tiny(mode: str = "joint", **kw) -> MedSegText:
    torch.manual_seed(0)
    return MedSegText.tiny(VOCAB, PAD, BOS, EOS, mode=mode, **kw)


def tokens_batch(batch: int = 2, length: int = 10) -> torch.Tensor:
    """BOS, words, EOS, then PAD: rows of different lengths."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((batch, length), PAD)
    for i in range(batch):
        n = length - 2 * i - 2
        tokens[i, 0] = BOS
        tokens[i, 1 : n + 1] = torch.randint(3, VOCAB, (n,), generator=g)
        tokens[i, n + 1] = EOS
    return tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These ops are tiny: on a shared 2-core box, two threads spin-wait on each other and run
    ~100x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def writer() -> MedSegText:
    """A random text model whose outputs depend on the image: some rows stop early, some run to
    max_length (default init gives near-uniform logits and the same sentence for every image)."""
    model = tiny("text", max_length=16).eval()
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.5)
        model.text_decoder.out.bias[EOS] = 1.5
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(5, 1, 64, 64) * torch.arange(1, 6).view(5, 1, 1, 1)


def eos_positions(ids: torch.Tensor) -> list[int]:
    return [row.tolist().index(EOS) if EOS in row else -1 for row in ids]


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("size", [(64, 64), (72, 60)])
@pytest.mark.parametrize("mode", ["joint", "segmentation", "text"])
def test_output_shapes_per_mode(mode, size):
    model = tiny(mode)
    out = model(torch.randn(2, 1, *size), tokens_batch())
    assert set(out) == {"joint": {"seg_logits", "text_logits"}, "segmentation": {"seg_logits"},
                        "text": {"text_logits"}}[mode]
    if "seg_logits" in out:
        assert out["seg_logits"].shape == (2, 1, *size)
    if "text_logits" in out:
        assert out["text_logits"].shape == (2, 10, VOCAB)


def test_joint_forward_without_tokens_gives_mask_only():
    assert set(tiny()(torch.randn(1, 1, 64, 64))) == {"seg_logits"}


def test_both_heads_send_gradients_into_the_encoder():
    model = tiny()
    out = model(torch.randn(2, 1, 64, 64), tokens_batch())
    stem = model.encoder.body.stem_0.weight
    for head in ("seg_logits", "text_logits"):
        model.zero_grad()
        out[head].pow(2).mean().backward(retain_graph=True)
        assert stem.grad is not None and stem.grad.abs().sum() > 0, head
        assert model.encoder.body.stages_3.blocks[0].conv_dw.weight.grad.abs().sum() > 0, head


# ------------------------------------------------------------------------------- text decoding
def test_cached_layer_is_torch_decoder_layer_math():
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    layer = CachedTransformerDecoderLayer(16, 4, 32, dropout=0.0).eval()
    layer.load_state_dict(ref.state_dict())
    x, memory = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    expected = ref(x, memory, tgt_mask=mask, tgt_is_causal=True)
    got = layer(x, layer.multihead_attn.key_value(memory))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cached_step_logits_match_full_forward(writer, images):
    decoder = writer.text_decoder
    with torch.no_grad():
        memory = decoder.encode_memory(writer.encoder(images)[-1])
        tokens = torch.randint(3, VOCAB, (5, 9))
        tokens[:, 0] = BOS
        full = decoder(tokens, memory)
        cache = decoder.init_cache(memory)
        stepped = torch.stack([decoder.step(tokens[:, t], cache) for t in range(tokens.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=1e-4)  # logits here are O(10)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_incremental_decoding_returns_the_tokens_of_full_recomputation(writer, images, beam_size):
    cached = writer.generate(images, beam_size=beam_size)
    full = writer.generate(images, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached, full)
    stops = eos_positions(cached)
    # the batch mixes early EOS (at different steps) and rows that run to max_length
    assert -1 in stops and len({s for s in stops if s >= 0}) >= 2, stops


def test_greedy_is_the_argmax_of_teacher_forced_logits(writer, images):
    """Independent reference: re-run forward() on the prefix and take the best allowed token."""
    generated = writer.generate(images)
    seq = torch.full((len(images), 1), BOS)
    with torch.no_grad():
        for _ in range(generated.shape[1]):
            logits = writer(images, seq)["text_logits"][:, -1]
            logits[:, [PAD, BOS]] = float("-inf")
            nxt = logits.argmax(-1)
            done = (seq[:, 1:] == EOS).any(1) if seq.shape[1] > 1 else torch.zeros(len(seq), dtype=torch.bool)
            seq = torch.cat([seq, nxt.masked_fill(done, PAD)[:, None]], dim=1)
    assert torch.equal(generated, seq[:, 1:])


def test_beam_size_one_equals_greedy_and_beam_output_is_well_formed(writer, images):
    greedy = writer.generate(images)
    assert torch.equal(writer.text_decoder.generate(
        writer.text_decoder.encode_memory(writer.encoder(images)[-1]), beam_size=1), greedy)
    beam = writer.generate(images, beam_size=4, length_penalty=0.6, max_length=10)
    assert beam.shape[1] <= 9 and not ((beam == BOS).any())
    for row in beam.tolist():  # PAD only after EOS
        if EOS in row:
            assert set(row[row.index(EOS) + 1 :]) <= {PAD}
        else:
            assert PAD not in row


def test_predict_returns_mask_and_tokens_from_one_call():
    model = tiny().eval()
    out = model.predict(torch.randn(2, 1, 64, 64), max_length=6, beam_size=2)
    assert out["seg_logits"].shape == (2, 1, 64, 64) and out["tokens"].shape[0] == 2
    assert out["tokens"].shape[1] <= 5


# --------------------------------------------------------------------------------------- loss
def test_joint_loss_components_and_pad_is_ignored():
    torch.manual_seed(0)
    tokens = tokens_batch()
    out = {"seg_logits": torch.randn(2, 1, 16, 16, requires_grad=True),
           "text_logits": torch.randn(2, 9, VOCAB, requires_grad=True)}
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    loss = JointLoss(w_seg=1.0, w_text=0.5, pad_id=PAD)
    parts = loss(out, mask, tokens[:, 1:])
    assert torch.allclose(parts["seg"], parts["dice"] + parts["bce"])
    assert torch.allclose(parts["total"], parts["seg"] + 0.5 * parts["text"])
    assert torch.allclose(parts["bce"], nn.functional.binary_cross_entropy_with_logits(out["seg_logits"], mask))
    parts["total"].backward()
    assert out["text_logits"].grad.abs().sum() > 0

    changed = out["text_logits"].detach().clone()
    changed[tokens[:, 1:] == PAD] = 100 * torch.randn(VOCAB)  # garbage at padded positions
    assert torch.allclose(loss({"text_logits": changed}, text_target=tokens[:, 1:])["text"], parts["text"])
    changed[0, 0, tokens[0, 1]] += 5.0  # a real position does count
    assert not torch.allclose(loss({"text_logits": changed}, text_target=tokens[:, 1:])["text"], parts["text"])

    assert set(loss({"seg_logits": out["seg_logits"]}, mask[:, 0])) == {"total", "seg", "dice", "bce"}
    assert set(loss({"text_logits": out["text_logits"]}, mask, tokens[:, 1:])) == {"total", "text"}
    with pytest.raises(ValueError, match="not aligned"):
        loss({"text_logits": out["text_logits"]}, text_target=tokens)
    with pytest.raises(ValueError, match="nothing to score"):
        loss({"seg_logits": out["seg_logits"]})


def test_uncertainty_weighting_learns_task_weights():
    loss = JointLoss(weighting="uncertainty")
    out = {"seg_logits": torch.randn(2, 1, 8, 8), "text_logits": torch.randn(2, 9, VOCAB)}
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.5, -0.3]))
    parts = loss(out, torch.ones(2, 1, 8, 8), tokens_batch()[:, 1:])
    s = loss.log_vars.detach()
    expected = torch.exp(-s[0]) * parts["seg"] + s[0] + torch.exp(-s[1]) * parts["text"] + s[1]
    assert torch.allclose(parts["total"], expected)
    parts["total"].backward()
    assert loss.log_vars.grad is not None and (loss.log_vars.grad != 0).all()
    assert list(JointLoss().parameters()) == []


# --------------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"B×C×H×W with C=1"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"B×C×H×W with C=1"):
        model(torch.randn(2, 1, 16, 64, 64))
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.randn(1, 1, 16, 64))
    bad = tokens_batch()
    bad[0, 3] = VOCAB
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        model(torch.randn(2, 1, 64, 64), bad)
    with pytest.raises(ValueError, match="integer"):
        model(torch.randn(2, 1, 64, 64), bad.float())
    with pytest.raises(RuntimeError, match="segmentation"):
        tiny("segmentation").generate(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="needs tokens"):
        tiny("text")(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="vocab_size"):
        MedSegText.tiny(mode="joint")
    with pytest.raises(ValueError, match="max_length"):
        model.eval().generate(torch.randn(1, 1, 64, 64), max_length=51)


def test_encoder_loads_rgb_timm_weights_into_a_one_channel_stem(tmp_path):
    torch.manual_seed(0)
    rgb = timm.create_model("convnext_atto", pretrained=False, in_chans=3, **TINY_ENCODER).eval()
    torch.save({"state_dict": rgb.state_dict()}, tmp_path / "rgb.pt")
    encoder = ConvNeXtEncoder("convnext_atto", in_channels=1, weights=tmp_path / "rgb.pt", **TINY_ENCODER).eval()
    grey = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = rgb.forward_intermediates(grey.expand(-1, 3, -1, -1), intermediates_only=True)
        got = encoder(grey)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match=r"(?s)do not fit.*shape mismatches"):
        ConvNeXtEncoder("convnext_atto", weights=tmp_path / "rgb.pt", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))


# ----------------------------------------------------------------------------------- training
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny()
    loss_fn = JointLoss(pad_id=PAD)
    x = torch.randn(2, 1, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 10:30, 12:40] = 1
    mask[1, :, 35:60, 5:25] = 1
    tokens = tokens_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        parts = loss_fn(model(x, tokens[:, :-1]), mask, tokens[:, 1:])
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        losses.append({k: float(v.detach()) for k, v in parts.items()})
    first, last = losses[0], losses[-1]
    assert last["total"] < 0.35 * first["total"], (first, last)
    assert last["text"] < 0.2 * first["text"] and last["seg"] < 0.7 * first["seg"], (first, last)
