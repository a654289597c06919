"""Data sets for training prefixes: E2E and WebNLG from the shared data directory, and user JSONL/CSV files.

Every loader returns `Example`s (one input/output pair each). Evaluation groups the references of one input
(`group_references`), as the E2E and WebNLG scoring scripts do: one system output per distinct input, scored
against all of its references.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

E2E_FIELDS = {  # MR attribute -> the name the prefix-tuning paper's linearisation uses
    "name": "name", "eatType": "Type", "food": "food", "priceRange": "price", "customer rating": "customer rating",
    "area": "area", "familyFriendly": "family friendly", "near": "near",
}
E2E_INPUT_FORMAT = ("E2E meaning representation linearised as 'name : The Eagle | Type : coffee shop | food : French "
                    "| price : moderate | customer rating : 3 out of 5 | area : riverside | family friendly : yes | "
                    "near : Burger King' (attributes in the MR's order), then a newline; the model writes the text")
WEBNLG_INPUT_FORMAT = ("WebNLG RDF triples linearised as 'subject : property : object | subject : property : object' "
                       "(underscores as spaces, quotes removed), then a newline; the model writes the text")
GENERIC_INPUT_FORMAT = "the text of the data file's input column, then a newline; the model writes the output"
PROMPT_TEMPLATE = "{input}\n"  # what the model sees before the target; the server gets the same string


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair."""

    input: str
    output: str
    group: str = ""  # a subset evaluation also reports apart (WebNLG test: "seen" / "unseen" categories)


@dataclass
class DataSplits:
    """Train / validation / test examples and how the inputs are formatted."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    input_format: str
    name: str


def data_dir() -> Path:
    """The shared data directory: $PREFIXSERVE_DATA_DIR, else ../shared/data relative to the repository root."""
    env = os.environ.get("PREFIXSERVE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prompt_for(text: str) -> str:
    """The prompt string a trained prefix expects for one input."""
    return PROMPT_TEMPLATE.format(input=text)


# ---------------------------------------------------------------- E2E

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")


def linearise_e2e(mr: str) -> str:
    """'name[The Eagle], eatType[coffee shop]' -> 'name : The Eagle | Type : coffee shop'."""
    items = _MR_ITEM.findall(mr)
    if not items:
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{E2E_FIELDS.get(k, k)} : {v.strip()}" for k, v in items)


def read_e2e_csv(path: str | Path) -> list[Example]:
    """Read an E2E CSV (columns mr,ref) into linearised examples, in file order."""
    with open(path, newline="", encoding="utf-8") as f:
        return [Example(linearise_e2e(row["mr"]), row["ref"].strip()) for row in csv.DictReader(f)]


def split_by_input(examples: list[Example], n_valid: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `n_valid` distinct inputs (all their references) for validation; the rest is training."""
    inputs = sorted({e.input for e in examples})
    rng = random.Random(seed)
    held = set(rng.sample(inputs, min(n_valid, len(inputs) - 1))) if n_valid > 0 else set()
    return [e for e in examples if e.input not in held], [e for e in examples if e.input in held]


def load_e2e(root: Path | None = None, n_valid_mrs: int = 50, seed: int = 0) -> DataSplits:
    """E2E: devset.csv split by MR into train/valid (the official train set is absent); testset_w_refs.csv as test."""
    d = (root or data_dir()) / "e2e"
    train, valid = split_by_input(read_e2e_csv(d / "devset.csv"), n_valid_mrs, seed)
    return DataSplits(train, valid, read_e2e_csv(d / "testset_w_refs.csv"), E2E_INPUT_FORMAT, "e2e")


# ---------------------------------------------------------------- WebNLG

def _clean_entity(text: str) -> str:
    return text.replace("_", " ").replace('"', "").strip()


def linearise_triples(triples: list[tuple[str, str, str]]) -> str:
    """[(s, p, o), ...] -> 's : p : o | s : p : o' with underscores as spaces and quotes removed."""
    return " | ".join(f"{_clean_entity(s)} : {p.strip()} : {_clean_entity(o)}" for s, p, o in triples)


def read_webnlg_xml(path: str | Path) -> list[Example]:
    """Read a WebNLG 2017 XML file: one example per <lex> of each <entry>, input from <modifiedtripleset>."""
    out = []
    for entry in ET.parse(path).getroot().iter("entry"):
        triples = [tuple(part.strip() for part in (t.text or "").split("|"))
                   for t in entry.find("modifiedtripleset").iter("mtriple")]
        if any(len(t) != 3 for t in triples):
            raise ValueError(f"{path}: malformed triple in entry {entry.get('eid')}: {triples}")
        src = linearise_triples(triples)  # type: ignore[arg-type]
        cat = entry.get("category", "")
        out += [Example(src, " ".join((lex.text or "").split()), cat) for lex in entry.iter("lex")]
    return out


def read_webnlg_json(path: str | Path) -> list[Example]:
    """Read the prefix-tuning distribution's dev.json (entries[i][str(i+1)] with modifiedtripleset, lexicalisations)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for i, wrapped in enumerate(data["entries"]):
        entry = wrapped[str(i + 1)]
        src = linearise_triples([(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]])
        out += [Example(src, " ".join(lex["lex"].split())) for lex in entry["lexicalisations"]]
    return out


def load_webnlg(root: Path | None = None) -> DataSplits:
    """WebNLG 2017: train/**/*.xml, dev.json as validation, test/testdata_with_lex.xml as test; test examples are
    grouped "seen" (a category of the training set) or "unseen"."""
    d = (root or data_dir()) / "webnlg"
    train = [e for f in sorted((d / "train").rglob("*.xml")) for e in read_webnlg_xml(f)]
    seen = {e.group for e in train}
    test = [Example(e.input, e.output, "seen" if e.group in seen else "unseen")
            for e in read_webnlg_xml(d / "test" / "testdata_with_lex.xml")]
    return DataSplits(train, read_webnlg_json(d / "dev.json"), test, WEBNLG_INPUT_FORMAT, "webnlg")


# ---------------------------------------------------------------- user files

def read_generic(path: str | Path, input_key: str = "input", output_key: str = "output") -> list[Example]:
    """Read a JSONL or CSV file with input/output columns (file type from the extension)."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif p.suffix.lower() in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"{p}: expected a .jsonl or .csv file")
    for i, row in enumerate(rows):
        if input_key not in row or output_key not in row:
            raise ValueError(f"{p}: row {i + 1} lacks the columns {input_key!r} and {output_key!r}: {sorted(row)}")
    return [Example(str(r[input_key]).strip(), str(r[output_key]).strip()) for r in rows]


def load_generic(path: str | Path, n_valid_inputs: int = 0, seed: int = 0) -> DataSplits:
    """A user file: validation = `n_valid_inputs` held-out inputs (default 5% of them); no separate test split."""
    ex = read_generic(path)
    distinct = len({e.input for e in ex})
    n = n_valid_inputs or (max(1, distinct // 20) if distinct > 1 else 0)
    train, valid = split_by_input(ex, n, seed)
    return DataSplits(train, valid, valid, GENERIC_INPUT_FORMAT, Path(path).stem)


DATA_SOURCES = {  # where each named data set comes from (docs/trainer.md#data)
    "e2e": "the E2E NLG Challenge data (devset.csv and testset_w_refs.csv of github.com/tuetschek/e2e-dataset)",
    "webnlg": "WebNLG 2017 as the prefix-tuning code distributes it (train/, dev.json, test/testdata_with_lex.xml)",
}


def load_data(spec: str, seed: int = 0) -> DataSplits:
    """'e2e', 'webnlg' or a path to a JSONL/CSV file; FileNotFoundError saying where the data goes when absent."""
    if spec in DATA_SOURCES:
        d = data_dir() / spec
        if not d.is_dir():
            raise FileNotFoundError(f"--data {spec}: no {d}: put {DATA_SOURCES[spec]} there, or set "
                                    "PREFIXSERVE_DATA_DIR to the directory that holds e2e/ and webnlg/ "
                                    "(docs/trainer.md#data)")
        return load_e2e(seed=seed) if spec == "e2e" else load_webnlg()
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--data {spec!r}: not e2e, webnlg or an existing .jsonl/.csv file with input and "
                                "output columns (docs/trainer.md#data)")
    return load_generic(spec, seed=seed)


def group_references(examples: list[Example]) -> tuple[list[str], list[list[str]]]:
    """Distinct inputs in first-seen order and, for each, all of its references."""
    refs: dict[str, list[str]] = {}
    for e in examples:
        refs.setdefault(e.input, []).append(e.output)
    return list(refs), list(refs.values())
