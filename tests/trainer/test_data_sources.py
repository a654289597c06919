"""`--data` as a plain clone meets it: a missing data set or a mistyped name is told with where the data comes
from (no traceback, nothing loaded first), and docs/trainer.md has the section the message points to."""
from __future__ import annotations

from pathlib import Path

import pytest

from prefixserve.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "trainer.md"


@pytest.mark.parametrize("name, words", [("e2e", ["e2e-dataset", "devset.csv"]), ("webnlg", ["WebNLG 2017"])])
def test_a_missing_data_set_says_where_it_comes_from(name, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFIXSERVE_DATA_DIR", str(tmp_path))
    code = main(["train", "--model", "no-such-model-is-loaded", "--data", name, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prefixserve: error: ") and "Traceback" not in err
    for w in [str(tmp_path / name), "PREFIXSERVE_DATA_DIR", "docs/trainer.md#data", *words]:
        assert w in err, (w, err)


def test_a_mistyped_data_name_is_named(tmp_path, capsys):
    assert main(["train", "--data", "e2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "'e2': not e2e, webnlg or an existing .jsonl/.csv file" in err


def test_trainer_docs_say_where_the_data_comes_from():
    text = DOCS.read_text()
    section = text.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]  # the anchor #data the messages link to
    for w in ("PREFIXSERVE_DATA_DIR", "devset.csv", "testset_w_refs.csv", "dev.json", "testdata_with_lex.xml",
              "`--data`", "input", "output", ".jsonl", ".csv"):
        assert w in section, w
