"""The E2E challenge metrics: BLEU, NIST, METEOR, ROUGE-L, CIDEr (corpus level, several references per output).

Definitions follow the E2E scoring script (github.com/tuetschek/e2e-metrics, `measure_scores.py`):
- BLEU-4 and NIST-5 as in mteval-v13a (its tokenisation, case-insensitive, BLEU brevity penalty against the closest
  reference length, shorter on ties; NIST information weights from the references of the whole corpus, length
  penalty against the average reference length). Implemented here (the script's own `pymteval` is unpackaged).
- METEOR 1.5 (`-l en -norm`, Java), ROUGE-L (beta 1.2) and CIDEr-D (sigma 6, document frequencies from the test
  references) from `pycocoevalcap`, after the Stanford PTB tokeniser (Java; lowercases, drops punctuation) — the
  same coco-caption code the script runs. Without Java, METEOR is reported as None and ROUGE-L / CIDEr use a
  Python approximation of that tokeniser (a documented deviation, see docs/trainer.md).
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from collections import Counter

logger = logging.getLogger(__name__)

_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def mteval_tokenize(sent: str) -> list[str]:
    """mteval-v13a's tokenisation (lowercased: the E2E script scores case-insensitively)."""
    s = sent.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    s = s.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    s = f" {s} "
    s = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", s)
    s = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", s)
    s = re.sub(r"([\.,])([^0-9])", r" \1 \2", s)
    s = re.sub(r"([0-9])(-)", r"\1 \2 ", s)
    return s.lower().split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: list[list[str]], n: int) -> Counter:
    merged: Counter = Counter()
    for r in refs:
        merged |= _ngrams(r, n)  # elementwise max
    return merged


def _check(hyps: list[str], refs: list[list[str]]) -> None:
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need one output per reference group, got {len(hyps)} outputs and {len(refs)} groups")
    if any(not r for r in refs):
        raise ValueError("every output needs at least one reference")


def corpus_bleu(hyps: list[str], refs: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU-4 in [0, 1] with mteval-v13a tokenisation and the closest-reference brevity penalty."""
    _check(hyps, refs)
    hits, totals, ref_len, hyp_len = [0] * max_n, [0] * max_n, 0, 0
    for hyp, rs in zip(hyps, refs):
        h, toks = mteval_tokenize(hyp), [mteval_tokenize(r) for r in rs]
        for n in range(1, max_n + 1):
            merged = _max_ref_counts(toks, n)
            hits[n - 1] += sum(min(c, merged[g]) for g, c in _ngrams(h, n).items())
            totals[n - 1] += max(len(h) - n + 1, 0)
        hyp_len += len(h)
        ref_len += len(min(toks, key=lambda r: (abs(len(r) - len(h)), len(r))))
    if min(hits) == 0:
        return 0.0
    log_p = sum(math.log(hits[i] / totals[i]) for i in range(max_n)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1e-5))
    return bp * math.exp(log_p)


def corpus_nist(hyps: list[str], refs: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 with information weights from all references and the average-reference length penalty."""
    _check(hyps, refs)
    ref_counts: list[Counter] = [Counter() for _ in range(max_n + 1)]  # index 0: the empty n-gram
    hit_ngrams: list[Counter] = [Counter() for _ in range(max_n)]
    hyp_totals, hyp_len, avg_ref_len = [0] * max_n, 0, 0.0
    for hyp, rs in zip(hyps, refs):
        h, toks = mteval_tokenize(hyp), [mteval_tokenize(r) for r in rs]
        for n in range(1, max_n + 1):
            merged = _max_ref_counts(toks, n)
            for g, c in _ngrams(h, n).items():
                if merged[g]:
                    hit_ngrams[n - 1][g] += min(c, merged[g])
            hyp_totals[n - 1] += max(len(h) - n + 1, 0)
            for r in toks:
                ref_counts[n].update(_ngrams(r, n))
        ref_counts[0][()] += sum(len(r) for r in toks)
        hyp_len += len(h)
        avg_ref_len += sum(len(r) for r in toks) / len(toks)

    def info(g: tuple[str, ...]) -> float:
        return math.log2(ref_counts[len(g) - 1][g[:-1]] / ref_counts[len(g)][g])

    score = sum(sum(info(g) * c for g, c in hit_ngrams[n].items()) / max(hyp_totals[n], 1) for n in range(max_n))
    ratio = hyp_len / avg_ref_len
    bp = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return bp * score


def java_available() -> bool:
    """True when a `java` binary is on PATH (METEOR and the PTB tokeniser need it)."""
    return shutil.which("java") is not None


def ptb_tokenize_py(sent: str) -> str:
    """A Python approximation of coco-caption's PTB tokenisation (lowercase, split punctuation, drop it).

    Like the Java pipeline, brackets become -lrb-/-rrb- and stay (its punctuation filter runs on the upper-case
    forms after lowercasing, so it never matches them).
    """
    s = re.sub(r"(n't|'s|'re|'ve|'ll|'d|'m)\b", r" \1", sent.lower())
    s = re.sub(r"(\.\.\.|--|[^\w\s'-]|(?<!\w)-|-(?!\w))", r" \1 ", s)
    toks = [{"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-"}.get(t, t) for t in s.split()]
    return " ".join(t for t in toks if t not in _PTB_PUNCT)


def _coco_tokenize(items: dict[int, list[str]], use_java: bool) -> dict[int, list[str]]:
    if not use_java:
        return {k: [ptb_tokenize_py(s) for s in v] for k, v in items.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": s} for s in v] for k, v in items.items()})


def coco_metrics(hyps: list[str], refs: list[list[str]], use_java: bool | None = None) -> dict[str, float | None]:
    """METEOR, ROUGE-L and CIDEr (CIDEr-D) through pycocoevalcap, as the E2E script computes them."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(hyps, refs)
    use_java = java_available() if use_java is None else use_java
    gts = _coco_tokenize(dict(enumerate(refs)), use_java)
    res = _coco_tokenize({i: [h] for i, h in enumerate(hyps)}, use_java)
    res = {k: [v[0] if v[0] else "<empty>"] for k, v in res.items()}  # the Java scorers reject empty strings
    out: dict[str, float | None] = {"METEOR": None}
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        meteor.meteor_p.kill()
    else:
        logger.warning("without java: METEOR skipped, ROUGE-L/CIDEr use the Python PTB tokeniser approximation")
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def corpus_ter(hyps: list[str], refs: list[list[str]]) -> float:
    """TER (sacrebleu's tercom port, case-insensitive, edits over the closest reference) as a fraction; lower is
    better. WebNLG 2017 reports it beside BLEU and METEOR."""
    from sacrebleu.metrics import TER

    _check(hyps, refs)
    n = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n)]
    return TER(case_sensitive=False).corpus_score(hyps, streams).score / 100


def e2e_metrics(hyps: list[str], refs: list[list[str]], use_java: bool | None = None) -> dict[str, float | None]:
    """All five E2E metrics; BLEU, METEOR and ROUGE-L as fractions in [0, 1], as the E2E script prints them."""
    return {"BLEU": corpus_bleu(hyps, refs), "NIST": corpus_nist(hyps, refs), **coco_metrics(hyps, refs, use_java)}
