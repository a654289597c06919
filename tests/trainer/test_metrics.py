"""The E2E metrics against independent implementations and values computed by hand."""
from __future__ import annotations

import math

import pytest

from trainer.metrics import coco_metrics, corpus_bleu, corpus_nist, java_available, mteval_tokenize, ptb_tokenize_py

HYPS = ["The Eagle is a coffee shop near Burger King.", "Alimentum is a cheap restaurant.", "blah"]
REFS = [["The Eagle is a coffee shop located near Burger King.", "Near Burger King, there is The Eagle coffee shop."],
        ["Alimentum is an inexpensive restaurant in the city centre."], ["blah blah is here.", "blah!"]]
needs_java = pytest.mark.skipif(not java_available(), reason="METEOR and the PTB tokeniser need java")


def test_bleu_matches_sacrebleu_with_variable_references():
    sacrebleu = pytest.importorskip("sacrebleu")
    streams = [[r[i] if i < len(r) else None for r in REFS] for i in range(2)]
    expected = sacrebleu.corpus_bleu(HYPS, streams, lowercase=True, tokenize="13a").score / 100
    assert corpus_bleu(HYPS, REFS) == pytest.approx(expected, abs=1e-12)
    assert corpus_bleu(HYPS, REFS) == pytest.approx(0.40777096259676, abs=1e-10)


def test_bleu_edge_cases():
    assert corpus_bleu(["a b c d e"], [["A B C D E"]]) == pytest.approx(1.0)  # case-insensitive
    assert corpus_bleu(["x y z w"], [["a b c d"]]) == 0.0
    # brevity penalty against the closest reference (5 tokens), not the shortest (2)
    assert corpus_bleu(["a b c d"], [["a b", "a b c d e"]]) == pytest.approx(math.exp(1 - 5 / 4))


def test_nist_by_hand():
    # info(a) = info(b) = log2(3/1); bigram (a,b): log2(count(a)/count(a b)) = 0. Unigram term: 2*log2(3)/2.
    # length ratio 2/3 -> penalty exactly 0.5 (how beta is defined).
    assert corpus_nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))
    # two references: counts a:2 b:1 c:1 d:1 (5 words); hit a -> log2(5/2); hit b -> log2(5/1); bigram (a b): log2(2/1)
    # hyp length 2 vs average reference length 2.5: penalty exp(-beta * ln(0.8)^2)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    want = ((math.log2(5 / 2) + math.log2(5)) / 2 + 1.0 / 1) * math.exp(-beta * math.log(0.8) ** 2)
    assert corpus_nist(["a b"], [["a b c", "a d"]]) == pytest.approx(want)


def test_mteval_tokenisation():
    # the same tokens as the E2E script's pymteval (checked against it), lowercased
    assert mteval_tokenize("It's £20-25, near Café Rouge. 3.5 stars (ok) & x") == [
        "it's", "£20", "-", "25", ",", "near", "café", "rouge", ".", "3.5", "stars", "(", "ok", ")", "&", "x"]


def test_rouge_and_cider_by_hand_without_java():
    # LCS("a b c", "a c d e f") = 2: P = 2/3, R = 2/5, F(beta=1.2) = (1 + 1.44) P R / (R + 1.44 P)
    p, r = 2 / 3, 2 / 5
    out = coco_metrics(["a b c", "x y z"], [["a c d e f"], ["x y z"]], use_java=False)
    assert out["METEOR"] is None
    assert out["ROUGE_L"] == pytest.approx(((2.44 * p * r) / (r + 1.44 * p) + 1.0) / 2)
    perfect = coco_metrics(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]], use_java=False)
    assert perfect["CIDEr"] == pytest.approx(10.0)  # CIDEr-D of exact matches: 10 * mean cosine of 1


@needs_java
def test_java_pipeline():
    sents = ["It's a family-friendly pub (cheap), near Café Rouge.", "The Eagle is 5 out of 5!"]
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sents)})
    assert [java[i][0] for i in range(2)] == [ptb_tokenize_py(s) for s in sents]
    good = coco_metrics(HYPS, REFS, use_java=True)
    assert good["METEOR"] == pytest.approx(0.4281497628, abs=1e-6)  # METEOR 1.5 jar on this example
    assert good["ROUGE_L"] == pytest.approx(coco_metrics(HYPS, REFS, use_java=False)["ROUGE_L"])
