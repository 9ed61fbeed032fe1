"""Caption metrics: corpus BLEU-1..4 (sacrebleu) and CIDEr-D, on the tokenizer's normalised text.

BLEU-1..4 are corpus BLEU (Papineni et al. 2002) from sacrebleu, with every reference caption of
an image; CIDEr-D (Vedantam et al. 2015) is computed as the COCO caption evaluation code does,
without Java.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from vit.captions.tokenizer import Tokenizer

__all__ = ["bleu_scores", "cider_d"]


def bleu_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4 in [0, 1] (sacrebleu; Papineni et al. 2002) of ``hypotheses[i]`` against
    all of ``references[i]``. Texts are compared as normalised by :meth:`Tokenizer.split`."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference lists: one per image"
        )
    if not hypotheses:
        raise ValueError("BLEU needs at least one hypothesis")
    if any(len(r) == 0 for r in references):
        raise ValueError("every image needs at least one reference caption")
    hyps = [" ".join(Tokenizer.split(h)) for h in hypotheses]
    most = max(len(r) for r in references)
    # sacrebleu takes reference *streams*; None fills in for images with fewer references.
    streams = [
        [" ".join(Tokenizer.split(r[k])) if k < len(r) else None for r in references]
        for k in range(most)
    ]
    out = {}
    for n in range(1, 5):
        # sacrebleu reads None as a missing reference (metrics/base.py) though it annotates
        # references as Sequence[Sequence[str]].
        score = BLEU(max_ngram_order=n, tokenize="none").corpus_score(hyps, streams)  # type: ignore[arg-type]
        out[f"bleu{n}"] = score.score / 100.0
    return out


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015), computed as the COCO caption evaluation code does,
    in pure Python (no Java): per n = 1..4, the cosine similarity of TF-IDF n-gram vectors (IDF
    over the images' reference sets), each hypothesis weight clipped at the reference's, times a
    Gaussian penalty on the length difference (``sigma``, lengths counted in bigrams); averaged
    over n and references, times 10, then over images. Texts are normalised by
    :meth:`Tokenizer.split`."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference lists: one per image"
        )

    def ngrams(text: str) -> Counter:
        words = Tokenizer.split(text)
        return Counter(
            tuple(words[i : i + n]) for n in range(1, 5) for i in range(len(words) - n + 1)
        )

    refs = [[ngrams(r) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_n = math.log(len(refs))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, norms, bigrams

    total = 0.0
    for hyp, rs in zip(hypotheses, refs, strict=True):
        h_vec, h_norm, h_len = tfidf(ngrams(hyp))
        score = 0.0
        for ref in rs:
            r_vec, r_norm, r_len = tfidf(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for n in range(4):
                dot = sum(
                    min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items()
                )
                if h_norm[n] and r_norm[n]:
                    dot /= h_norm[n] * r_norm[n]
                score += dot * penalty
        total += 10.0 * score / 4 / len(rs)
    return total / len(hypotheses)
