"""The data loaders parse every file in the shared data directory, with the paper's linearisations."""
from __future__ import annotations

import csv
import json

import pytest

from trainer.data import (data_dir, group_references, linearise_e2e, linearise_triples, load_e2e, load_generic,
                          load_webnlg, read_e2e_csv, read_webnlg_xml, split_by_input)

DATA = data_dir()
pytestmark = pytest.mark.skipif(not (DATA / "e2e").is_dir(), reason=f"no shared data at {DATA}")


def test_e2e_linearisation():
    mr = "name[The Eagle], eatType[coffee shop], food[French], priceRange[£20-25], familyFriendly[yes], near[Burger King]"
    assert linearise_e2e(mr) == ("name : The Eagle | Type : coffee shop | food : French | price : £20-25 | "
                                 "family friendly : yes | near : Burger King")


def test_e2e_files_and_grouping():
    dev, test = read_e2e_csv(DATA / "e2e" / "devset.csv"), read_e2e_csv(DATA / "e2e" / "testset_w_refs.csv")
    assert (len(dev), len(test)) == (4672, 4693)
    assert len(group_references(dev)[0]) == 547 and len(group_references(test)[0]) == 630
    assert all(e.output and " : " in e.input and "[" not in e.input for e in dev + test)


def test_e2e_validation_holds_out_whole_mrs():
    s = load_e2e(n_valid_mrs=50, seed=3)
    train_mrs, valid_mrs = {e.input for e in s.train}, {e.input for e in s.valid}
    assert len(valid_mrs) == 50 and not train_mrs & valid_mrs
    assert len(s.train) + len(s.valid) == 4672 and len(s.test) == 4693


def test_every_webnlg_file_parses():
    files = sorted((DATA / "webnlg").rglob("*.xml"))
    assert len(files) > 40
    for f in files:
        ex = read_webnlg_xml(f)
        assert ex and all(e.input and e.output for e in ex), f
    s = load_webnlg()
    entries = json.loads((DATA / "webnlg" / "dev.json").read_text())["entries"]
    assert len(entries) == 872 and len(s.valid) == sum(len(e[str(i + 1)]["lexicalisations"])
                                                       for i, e in enumerate(entries))
    assert len(group_references(s.test)[0]) == 1862  # the WebNLG 2017 test set's entries
    assert s.test[0].input == "Abilene Regional Airport : cityServed : Abilene, Texas"


def test_triple_linearisation():
    assert linearise_triples([("Aarhus_Airport", "cityServed", '"Aarhus"'), ("A", "p", "B")]) == \
        "Aarhus Airport : cityServed : Aarhus | A : p : B"


def test_generic_jsonl_and_csv(tmp_path):
    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["input", "output"])
        w.writeheader()
        w.writerows(rows)
    for name in ("d.jsonl", "d.csv"):
        s = load_generic(tmp_path / name)
        assert len(s.train) + len(s.valid) == 40 and len(s.valid) == 2
        assert not {e.input for e in s.train} & {e.input for e in s.valid}
    (tmp_path / "bad.jsonl").write_text('{"question": "x", "output": "y"}\n')
    with pytest.raises(ValueError, match="input"):
        load_generic(tmp_path / "bad.jsonl")


def test_split_is_seeded():
    ex = read_e2e_csv(DATA / "e2e" / "devset.csv")
    assert split_by_input(ex, 10, 1) == split_by_input(ex, 10, 1)
