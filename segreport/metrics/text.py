"""Report-text metrics as in seed 000 (IV.B): BLEU-1..4, METEOR and ROUGE-L F1 via nltk and rouge-score.

Preprocessing (seed 000: "standard tokenization and lowercasing"): lower-case, then NLTK's
``wordpunct_tokenize`` (words and punctuation runs are separate tokens, so "areas,lower" gives
``areas , lower``). ``word_tokenize`` is not used: it needs the punkt_tab model, not shipped here.
Every metric sees the same tokens.

- BLEU-n (n = 1..4): uniform weights over 1..n-grams.
  * corpus BLEU: ``nltk.translate.bleu_score.corpus_bleu`` over all samples, **no smoothing**
    (n-gram counts are summed over the corpus, as in Papineni et al.);
  * sentence BLEU: ``sentence_bleu`` per sample with ``SmoothingFunction().method1`` (a zero
    n-gram count becomes 0.1, so one sentence without a 4-gram match is not scored 0), then the mean.
- METEOR: ``nltk.translate.meteor_score.meteor_score`` per sample (exact, Porter-stem and WordNet
  synonym matches; nltk's default alpha=0.9, beta=3, gamma=0.5), then the mean. WordNet is loaded
  on first use via ``segreport.text.nltk_setup.ensure_wordnet``.
- ROUGE-L: F1 of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` per sample, then the mean.
  rouge-score is given the tokeniser above, so no stemming (``use_stemmer`` only applies to its
  own tokeniser) and punctuation counts as in BLEU; METEOR is the metric that credits stems.

Each reference may be a string or a list of strings (several references for one sample): BLEU and
METEOR use all of them natively; ROUGE-L takes the best-matching one (``score_multi``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score.rouge_scorer import RougeScorer
from rouge_score.tokenizers import Tokenizer

BLEU_WEIGHTS: dict[int, tuple[float, ...]] = {n: (1.0 / n,) * n for n in range(1, 5)}
SAMPLE_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l")

_wordnet_ready = False


def tokenize(text: str) -> list[str]:
    """Lower-case and split into word and punctuation tokens (seed 000 preprocessing)."""
    return wordpunct_tokenize(text.lower())


class _SeedTokenizer(Tokenizer):
    """rouge-score adapter so ROUGE-L sees the same tokens as BLEU and METEOR."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


def _ensure_wordnet() -> None:
    global _wordnet_ready
    if not _wordnet_ready:
        from segreport.text.nltk_setup import ensure_wordnet

        ensure_wordnet(verbose=False)
        _wordnet_ready = True


def _as_list(refs: str | Sequence[str]) -> list[str]:
    return [refs] if isinstance(refs, str) else list(refs)


def text_metrics(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str], per_sample: bool = True) -> dict:
    """Corpus and per-sample text scores (see module docstring for every choice).

    Returns ``{"bleu1".."bleu4": corpus BLEU (no smoothing), "sentence_bleu1".."sentence_bleu4":
    mean sentence BLEU (method1), "meteor": mean METEOR, "rouge_l": mean ROUGE-L F1, "n": samples,
    "per_sample": [{"bleu1".."bleu4" (sentence, method1), "meteor", "rouge_l"}, ...]}``
    (``per_sample`` only when asked, the default).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("text_metrics needs at least one sample")
    _ensure_wordnet()
    refs = [_as_list(r) for r in references]
    ref_tokens = [[tokenize(r) for r in rs] for rs in refs]
    hyp_tokens = [tokenize(h) for h in hypotheses]
    smooth = SmoothingFunction().method1
    rouge = RougeScorer(["rougeL"], tokenizer=_SeedTokenizer())

    with warnings.catch_warnings():
        # nltk warns whenever an n-gram order has no match; a 0 there is the intended unsmoothed value
        warnings.simplefilter("ignore", UserWarning)
        rows = []
        for rt, ht, rs, h in zip(ref_tokens, hyp_tokens, refs, hypotheses):
            row = {f"bleu{n}": float(sentence_bleu(rt, ht, weights=w, smoothing_function=smooth)) for n, w in BLEU_WEIGHTS.items()}
            row["meteor"] = float(meteor_score(rt, ht))
            row["rouge_l"] = float(rouge.score_multi(rs, h)["rougeL"].fmeasure)
            rows.append(row)
        out: dict = {f"bleu{n}": float(corpus_bleu(ref_tokens, hyp_tokens, weights=w)) for n, w in BLEU_WEIGHTS.items()}

    n = len(rows)
    out.update({f"sentence_bleu{k}": sum(r[f"bleu{k}"] for r in rows) / n for k in BLEU_WEIGHTS})
    out["meteor"] = sum(r["meteor"] for r in rows) / n
    out["rouge_l"] = sum(r["rouge_l"] for r in rows) / n
    out["n"] = n
    if per_sample:
        out["per_sample"] = rows
    return out
