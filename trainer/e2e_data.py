"""E2E training data made faithful and varied: MRs fixed to what their references say, and venue types and foods
swapped for other values of the E2E ontology.

The E2E devset, our only training data, has two problems the test set exposes. Its references leave out about a
tenth of their MR's values (`trainer.slots` finds them), so a model trained on it learns to drop facts; and every
one of its MRs is a coffee shop serving English or Chinese food, while the test set's venues are mostly pubs and
restaurants serving seven cuisines. `fix_mrs` removes from each MR the attributes its reference does not express
(and drops pairs whose reference states a wrong or extra value), as Dušek et al. (2019) cleaned E2E; `swap_values`
rewrites a pair with another venue type and food, drawn from the ontology the E2E dataset paper publishes
(Novikova et al. 2017: eatType and food domains; `trainer.slots.VALUE_PATTERNS`), in the MR and in the text.
"""
from __future__ import annotations

import hashlib
import random
import re

from trainer.data import Example
from trainer.slots import NAME_ATTRS, VALUE_PATTERNS, canonical, check_output, parse_mr

SWAPPED = ("Type", "food")  # the attributes whose devset values do not cover the ontology
_SURFACE = {"Fast food": "fast food"}  # how a value is written inside a sentence (others: as in the MR)
_VOWEL_SOUND = re.compile(r"^(?:[aeio]|u(?!ni))", re.I)


def unparse_mr(mr: dict[str, str]) -> str:
    """{'name': 'The Eagle', 'Type': 'pub'} -> 'name : The Eagle | Type : pub' (the linearised format)."""
    return " | ".join(f"{k} : {v}" for k, v in mr.items())


def fix_mrs(examples: list[Example]) -> list[Example]:
    """Each MR reduced to the attributes its reference expresses; pairs whose reference misses the name or states
    a wrong or extra value are dropped."""
    venues = {m[a] for m in (parse_mr(e.input) for e in examples) for a in NAME_ATTRS if a in m}
    out = []
    for e in examples:
        mr = parse_mr(e.input)
        res = check_output(mr, e.output, venues)
        if res["wrong"] or res["added"] or "name" in res["missing"]:
            continue
        kept = {k: v for k, v in mr.items() if k not in res["missing"]}
        out.append(Example(unparse_mr(kept), e.output, e.group))
    return out


def _venue_spans(text: str, mr: dict[str, str]) -> list[tuple[int, int]]:
    spans = []
    for a in NAME_ATTRS:
        if a in mr:
            spans += [m.span() for m in re.finditer(re.escape(mr[a]), text, re.I)]
    return spans


def _rewrite(text: str, attr: str, old: str, new: str, venues: list[tuple[int, int]]) -> str | None:
    """The text with every mention of `old` (outside venue names) written as `new`; None when there is none."""
    rx = re.compile(r"(?<![\w£])(?:%s)(?!\w)" % VALUE_PATTERNS[attr][old], re.I)
    hits = [m for m in rx.finditer(text) if not any(s < m.end() and m.start() < e for s, e in venues)]
    if not hits:
        return None
    surface = _SURFACE.get(new, new)
    for m in reversed(hits):
        word = surface[0].upper() + surface[1:] if m.start() == 0 else surface
        text = text[:m.start()] + word + text[m.end():]
        art = re.search(r"\b(an?)\s+$", text[:m.start()], re.I)  # "an English pub" -> "a French pub"
        if art:
            fixed = "an" if _VOWEL_SOUND.match(surface) else "a"
            fixed = fixed.capitalize() if art.group(1)[0].isupper() else fixed
            text = text[:art.start(1)] + fixed + text[art.end(1):]
    return text


def swap_values(e: Example, seed: int, unstated_keep: bool = True) -> Example:
    """The pair with its Type and food values drawn anew from the ontology (the same draw for every reference of
    one MR and seed), in the MR and in the text. An attribute whose value the text does not state keeps it, unless
    `unstated_keep` is False (evaluation: every reference of an MR then stays with its one new MR)."""
    mr = parse_mr(e.input)
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}|{e.input}".encode()).digest()[:8], "big"))
    text = e.output
    for attr in SWAPPED:
        new = rng.choice(sorted(VALUE_PATTERNS[attr]))  # drawn for every attribute, so draws do not shift
        if attr not in mr:
            continue
        old = canonical(attr, mr[attr])
        if old == new or old not in VALUE_PATTERNS[attr]:
            continue
        rewritten = _rewrite(text, attr, old, new, _venue_spans(text, mr))
        if rewritten is not None or not unstated_keep:
            text, mr[attr] = rewritten or text, new
    return Example(unparse_mr(mr), text, e.group)
