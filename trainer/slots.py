"""E2E slot error rate: does the text say every value of its meaning representation, and nothing else?

For each attribute of the MR the text either expresses its value (correct), expresses another value of that
attribute (wrong), or none (missing); an attribute the MR lacks but the text expresses is added. The slot error
rate is (missing + wrong + added) / the number of values in the MRs (Dušek et al. 2019's definition), reported
overall and per attribute. Values are found by hand-written patterns (`VALUE_PATTERNS`): surface forms seen in E2E
references, with the venue names masked first (so "Raja Indian Cuisine" is not Indian food). The numeric and the
word forms of one scale point are one value: price `cheap` = `less than £20`, `moderate` = `£20-25`,
`high` = `more than £30`; rating `low` = `1 out of 5`, `average` = `3 out of 5`, `high` = `5 out of 5`.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

NAME_ATTRS = ("name", "near")  # literal venue names


def _alts(*forms: str) -> str:
    return "|".join(forms)


_PRICE = r"pric(?:e|es|ed|ing)|cost(?:s|ing)?"
_RATING = r"rat(?:ing|ings|ed)|reviews?|stars?|satisfaction|score"
# Canonical value -> pattern, per attribute (linearised attribute names, trainer.data.E2E_FIELDS).
VALUE_PATTERNS: dict[str, dict[str, str]] = {
    "Type": {
        "coffee shop": r"coffee[- ]?(?:shop|house|ship)s?|caf[eé]s?",
        "pub": r"pubs?|public house",
        "restaurant": r"restaurants?",
    },
    "food": {
        "English": r"english|british",
        "French": r"french",
        "Italian": r"italian",
        "Chinese": r"chinese",
        "Indian": r"indian",
        "Japanese": r"japanese|sushi",
        "Fast food": r"fast[- ]?foods?",
    },
    "price": {
        "cheap": _alts(r"cheap(?:er|est|ly)?", r"below[- ]average[- ](?:%s)" % _PRICE, r"inexpensive", r"affordabl[ey]", r"budget", r"bargain",
                       r"low(?:er)?[- ](?:to[- ]\w+[- ])?(?:%s)" % _PRICE, r"(?:%s)(?: range)? (?:is |are )?low" % _PRICE,
                       r"(?:less than|under|below|lower than|up to) (?:£ ?|l)?20", r"20 ?(?:£|pounds|euros?) or less"),
        "moderate": _alts(r"moderate(?:ly)?(?![- ](?:customer |consumer )?(?:rat|review|star|score))", r"mid[- ]?(?:range|priced)", r"medium[- ](?:%s)" % _PRICE,
                          r"(?<!below )(?<!below-)average[- ](?:%s)" % _PRICE, r"(?:%s)(?: range)? (?:is |are )?(?:average|medium)" % _PRICE,
                          r"reasonabl[ey](?:[- ]priced)?", r"(?:£ ?)?20 ?(?:-|to|–) ?(?:£ ?)?25"),
        "high": _alts(r"expensive", r"pricey", r"pricy", r"costly", r"high[- ](?:end|class|(?:%s))" % _PRICE,
                      r"(?:%s)(?: range)? (?:is |are )?high" % _PRICE, r"upscale", r"up[- ]?market",
                      r"(?:more than|over|above|greater than|at least) (?:£ ?|l)?30", r"30 ?(?:£|pounds|euros?)? ?(?:\+|plus)"),
    },
    "customer rating": {
        "low": _alts(r"(?:1|one)(?: out)? of (?:5|five)", r"rat(?:ing|ed) (?:of )?(?:1|one)(?![\w/])", r"(?:1|one)[- ]stars?", r"(?:1|one)/5",
                     r"(?:low(?:ly)?|poor(?:ly)?|bad(?:ly)?)(?:[- ](?:customer|consumer))?[- ](?:%s)" % _RATING,
                     r"(?:%s)(?: of| is| are| as)? (?:low|poor|bad)" % _RATING),
        "average": _alts(r"(?:3|three)(?: out)? of (?:5|five)", r"rat(?:ing|ed) (?:of )?(?:3|three)(?![\w/])", r"(?:3|three)[- ]stars?", r"(?:3|three)/5",
                         r"(?:average|mediocre|medium|moderate|ok|okay|decent)(?:ly)?(?:[- ](?:customer|consumer))?"
                         r"[- ](?:%s)" % _RATING,
                         r"(?:%s)(?: of| is| are| as)? (?:average|mediocre|medium|moderate|ok|okay|decent)" % _RATING),
        "high": _alts(r"(?:5|five)(?: out)? of (?:5|five)", r"rat(?:ing|ed) (?:of )?(?:5|five)(?![\w/])", r"(?:5|five)[- ]stars?", r"(?:5|five)/5",
                      r"(?:high(?:ly)?|excellent|great|top|good|well)(?:[- ](?:customer|consumer))?[- ](?:%s)" % _RATING,
                      r"(?:%s)(?: of| is| are| as)? (?:high(?:ly)?|excellent|great|top)" % _RATING),
    },
    "area": {
        "riverside": r"river(?:side)?|river side|waterfront",
        "city centre": r"(?:city|town) cent(?:re|er)|(?:cent(?:re|er)|middle|heart) of (?:the )?(?:city|town)|centrally|downtown|city",
    },
    "family friendly": {
        "yes": r"(?:family|families|kids?|child|children|toddlers?)[- ]?(?:friendly|oriented)"
               r"|(?:friendly|welcoming|suitable|great|good|ideal) (?:to|for|towards?) (?:the )?"
               r"(?:whole )?(?:family|families|kids|children)"
               r"|(?:welcomes?|allows?|accepts?|loves?|for) (?:the )?(?:whole )?(?:family|families|kids|children)"
               r"|(?:families|kids|children) (?:are )?(?:welcome|allowed)",
        "no": r"adults?[- ]only|(?:no|not for) (?:kids|children|famil(?:y|ies))|(?:family|kids?|child|children)[- ]?"
              r"unfriendly|(?:kids|children|families) (?:are )?not (?:allowed|welcome|permitted)"
              r"|(?:not|n't) (?:allow|welcome|cater to|cater for) (?:kids|children|families)",
    },
}
# The MR's values as written in E2E, mapped to the canonical value of their attribute.
VALUE_ALIASES = {
    "price": {"less than £20": "cheap", "£20-25": "moderate", "more than £30": "high"},
    "customer rating": {"1 out of 5": "low", "3 out of 5": "average", "5 out of 5": "high"},
}
_FAMILY_YES = re.compile(VALUE_PATTERNS["family friendly"]["yes"], re.I)
_NEGATION = re.compile(r"(?:\b(?:not|no|never|non)|n't)\b[\w' -]{0,12}$")
_COMPILED = {a: {v: re.compile(r"(?<![\w£])(?:%s)(?![\w])" % p, re.I) for v, p in vals.items()}
             for a, vals in VALUE_PATTERNS.items()}


def normalise(text: str) -> str:
    """Lower case, accents removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(text.lower().split())


def parse_mr(linearised: str) -> dict[str, str]:
    """'name : The Eagle | Type : coffee shop' -> {'name': 'The Eagle', 'Type': 'coffee shop'}."""
    out = {}
    for item in linearised.split(" | "):
        key, sep, value = item.partition(" : ")
        if not sep:
            raise ValueError(f"not a linearised E2E meaning representation: {linearised!r}")
        out[key.strip()] = value.strip()
    return out


def canonical(attr: str, value: str) -> str:
    """The MR value as a key of VALUE_PATTERNS[attr] (numeric and word forms of a scale point are one)."""
    v = VALUE_ALIASES.get(attr, {}).get(value, value)
    for key in VALUE_PATTERNS.get(attr, {}):
        if key.lower() == v.lower():
            return key
    return v


def _family_values(text: str) -> set[str]:
    """'yes' for each unnegated family-friendly phrase, 'no' for each negated one or an explicit refusal."""
    found = {"no"} if _COMPILED["family friendly"]["no"].search(text) else set()
    for m in _FAMILY_YES.finditer(text):
        found.add("no" if _NEGATION.search(text[max(0, m.start() - 24):m.start()]) else "yes")
    return found


def mentioned(attr: str, text: str) -> set[str]:
    """Canonical values of `attr` that the (normalised, venue-masked) text expresses."""
    if attr == "family friendly":
        return _family_values(text)
    return {v for v, rx in _COMPILED.get(attr, {}).items() if rx.search(text)}


def mask_venues(text: str, venues: set[str]) -> tuple[str, set[str]]:
    """Replace every venue name in the normalised text by a placeholder; return the text and the names found."""
    found = set()
    for venue in sorted(venues, key=len, reverse=True):  # longest first: 'Café Rouge' before 'Rouge'
        v = normalise(venue)
        rx = re.compile(r"(?<!\w)%s(?!\w)" % re.escape(v))
        if rx.search(text):
            found.add(venue)
            text = rx.sub(" @ ", text)
    return text, found


@dataclass
class SlotCounts:
    """Counts for one attribute (or all of them)."""

    values: int = 0
    missing: int = 0
    wrong: int = 0
    added: int = 0

    @property
    def errors(self) -> int:
        """missing + wrong + added."""
        return self.missing + self.wrong + self.added

    @property
    def rate(self) -> float:
        """Slot error rate: errors over the MR values."""
        return self.errors / self.values if self.values else 0.0


@dataclass
class SlotReport:
    """Slot errors over a corpus: overall, per attribute, and what went wrong in each output."""

    total: SlotCounts = field(default_factory=SlotCounts)
    by_attr: dict[str, SlotCounts] = field(default_factory=dict)
    per_output: list[dict[str, list[str]]] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready: SER, counts, and each attribute's counts and rate."""
        def one(c: SlotCounts) -> dict:
            return {"values": c.values, "missing": c.missing, "wrong": c.wrong, "added": c.added, "SER": c.rate}
        return {**one(self.total), "by_attribute": {a: one(c) for a, c in self.by_attr.items()}}


def check_output(mr: dict[str, str], text: str, venues: set[str]) -> dict[str, list[str]]:
    """The attributes of one output that are missing, wrong, added (and correct)."""
    norm, found = mask_venues(normalise(text), venues | {mr[a] for a in NAME_ATTRS if a in mr})
    res: dict[str, list[str]] = {"correct": [], "missing": [], "wrong": [], "added": []}
    for attr in NAME_ATTRS:
        if attr in mr:
            res["correct" if mr[attr] in found else "missing"].append(attr)
    others = found - {mr[a] for a in NAME_ATTRS if a in mr}
    if "near" not in mr and others:
        res["added"].append("near")
    for attr in VALUE_PATTERNS:
        said = mentioned(attr, norm)
        if attr not in mr:
            if said:
                res["added"].append(attr)
        elif canonical(attr, mr[attr]) in said:
            res["correct"].append(attr)
        else:
            res["wrong" if said else "missing"].append(attr)
    return res


def slot_errors(inputs: list[str], outputs: list[str], venues: set[str] | None = None) -> SlotReport:
    """Slot errors of outputs for linearised E2E inputs; venues default to every name/near value in the inputs."""
    mrs = [parse_mr(i) for i in inputs]
    venues = venues if venues is not None else {m[a] for m in mrs for a in NAME_ATTRS if a in m}
    report = SlotReport()
    for mr, text in zip(mrs, outputs):
        res = check_output(mr, text, venues)
        report.per_output.append({k: v for k, v in res.items() if k != "correct"})
        for attr in mr:
            report.by_attr.setdefault(attr, SlotCounts()).values += 1
        for kind in ("missing", "wrong", "added"):
            for attr in res[kind]:
                c = report.by_attr.setdefault(attr, SlotCounts())
                setattr(c, kind, getattr(c, kind) + 1)
    counts = Counter()
    for c in report.by_attr.values():
        for k in ("values", "missing", "wrong", "added"):
            counts[k] += getattr(c, k)
    report.total = SlotCounts(**counts)
    return report


def is_e2e_input(text: str) -> bool:
    """True when a linearised input looks like an E2E MR (has a name and only E2E attributes)."""
    try:
        mr = parse_mr(text)
    except ValueError:
        return False
    return "name" in mr and set(mr) <= set(VALUE_PATTERNS) | set(NAME_ATTRS)


# Phrases of which one should appear for each canonical value (the decoding constraint `must_include`; a softer
# test than the patterns above, which judge the output): at most 8 per value, the server's limit.
PHRASES: dict[str, dict[str, list[str]]] = {
    "area": {"riverside": ["riverside", "river"], "city centre": ["city centre", "city center", "centre of"]},
    "price": {"cheap": ["cheap", "less than £20", "low price", "inexpensive", "affordable", "low-priced"],
              "moderate": ["moderate", "£20-25", "average price", "mid-range", "reasonabl"],
              "high": ["high price", "high priced", "high-priced", "expensive", "more than £30", "high-end",
                       "pricey", "costly"]},
    "customer rating": {"low": ["low", "1 out of 5", "one star", "1 star", "poor"],
                        "average": ["average", "3 out of 5", "three star", "3 star"],
                        "high": ["high customer", "high rating", "highly rated", "5 out of 5", "five star",
                                 "5 star", "excellent", "highly"]},
    "family friendly": {"yes": ["family friendly", "family-friendly", "kid friendly", "kid-friendly",
                                "children friendly", "child friendly", "kids friendly", "families"],
                        "no": ["not family", "not kid", "not children", "not child", "adults only", "adult only",
                               "no children", "non family"]},
}


def mr_phrases(linearised: str) -> list[list[str]]:
    """For each attribute of an E2E MR, the phrases of which one the text should contain (`must_include`):
    names and venue types as they are, food in either case, the other values from PHRASES."""
    out = []
    for attr, value in parse_mr(linearised).items():
        key = canonical(attr, value)
        if attr in PHRASES and key in PHRASES[attr]:
            out.append(list(PHRASES[attr][key]))
        elif attr == "food":
            out.append(sorted({value, value.lower()}))
        else:
            out.append([value])
    return out
