"""docs/results.md rows come from run and evaluation directories, with nothing invented."""
from __future__ import annotations

import json

import pytest

from trainer.results import main


def test_results_table_from_run_and_eval_dirs(tmp_path):
    run, ev = tmp_path / "run", tmp_path / "eval"
    run.mkdir()
    ev.mkdir()
    (run / "summary.json").write_text(json.dumps({"trained_share": 0.0461, "stored_share": 0.000856,
                                                  "train_seconds": 948.0, "cpu_seconds": 601.0, "steps": 250,
                                                  "machine": {"cpu": "AMD EPYC", "torch_threads": 1}}))
    (ev / "metrics.json").write_text(json.dumps({"metrics": {"BLEU": 0.617, "NIST": 7.35, "METEOR": 0.399,
                                                             "ROUGE_L": 0.65, "CIDEr": 2.14, "SER": 0.0312},
                                                 "num_beams": 5, "inputs": 50}))
    out = tmp_path / "results.md"
    out.write_text("intro\n<!-- RESULTS -->\nold\n<!-- /RESULTS -->\nnotes\n")
    assert main(["--row", "prefix", str(run), str(ev), "--row", "untuned", "-", str(ev), "--out", str(out)]) == 0
    text = out.read_text()
    assert ("| prefix | 61.7 | 7.35 | 39.9 | 65.0 | 2.14 | 3.1 | 4.610% | 0.0856% | 250 steps, 16 min wall, CPU 10 min "
            "| AMD EPYC, 1 thread | beam 5, 50 MRs |") in text
    assert "| untuned | 61.7 | 7.35 | 39.9 | 65.0 | 2.14 | 3.1 | 0 | 0 | - | - |" in text
    assert "old" not in text and text.startswith("intro\n") and text.endswith("notes\n")
    assert "paper: prefix-tuning, GPT-2 medium | 69.7" in text


def test_update_keeps_existing_rows_and_replaces_same_label(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"metrics": {"BLEU": 0.5, "NIST": 6.0, "METEOR": None,
                                                             "ROUGE_L": 0.6, "CIDEr": 1.5},
                                                 "num_beams": 1, "inputs": 10}))
    out = tmp_path / "results.md"
    out.write_text("intro\n<!-- RESULTS -->\n<!-- /RESULTS -->\nnotes\n")
    assert main(["--row", "a", "-", str(ev), "--row", "b", "-", str(ev), "--out", str(out)]) == 0
    (ev / "metrics.json").write_text(json.dumps({"metrics": {"BLEU": 0.25, "NIST": 6.0, "METEOR": None,
                                                             "ROUGE_L": 0.6, "CIDEr": 1.5},
                                                 "num_beams": 1, "inputs": 10}))
    assert main(["--row", "a", "-", str(ev), "--row", "c", "-", str(ev), "--out", str(out), "--update"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "system" not in line]
    assert [r.split("|")[1].strip() for r in rows][:3] == ["a", "b", "c"]
    assert rows[0].startswith("| a | 25.0 |") and rows[1].startswith("| b | 50.0 |") and "| n/a |" in rows[1]
    assert sum("paper: prefix-tuning" in r for r in rows) == 1  # the paper's rows are not kept twice
    assert main(["--row", "c", "-", str(ev), "--out", str(out)]) == 0  # without --update: only the given rows
    assert "| a |" not in out.read_text()


def test_scores_go_into_the_manifest_and_leave_the_tensors(tmp_path):
    import torch

    from prefix_store.artifact import build_artifact, load_dir, save_dir

    fp = {"model_type": "llama", "num_layers": 1, "num_kv_heads": 1, "head_dim": 2, "hidden_size": 2,
          "vocab_size": 10, "config_hash": "x"}
    art = build_artifact(torch.ones(1, 2, 1, 3, 2), fp, description="d", extra={"training": {"steps": 3}})
    save_dir(art, tmp_path / "a")
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"metrics": {"BLEU": 0.66, "SER": 0.04}, "num_beams": 1,
                                                 "max_new_tokens": 64, "inputs": 630, "decode_seconds": 9.0,
                                                 "slot_errors": {"SER": 0.04}}))
    assert main(["--manifest", str(tmp_path / "a"), "--score", "e2e test, greedy", str(ev)]) == 0
    back = load_dir(tmp_path / "a")  # the hash still matches the tensors
    assert back.manifest.sha256 == art.manifest.sha256 and back.manifest.extra["training"] == {"steps": 3}
    got = back.manifest.extra["scores"]["e2e test, greedy"]
    assert got["metrics"]["BLEU"] == 0.66 and got["inputs"] == 630 and "decode_seconds" not in got


def test_named_tables_and_group_tables(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({
        "metrics": {"BLEU": 0.5, "METEOR": 0.4, "TER": 0.45}, "num_beams": 1, "inputs": 30, "quantization": "q4",
        "groups": {"seen": {"inputs": 20, "metrics": {"BLEU": 0.6, "METEOR": 0.42, "TER": 0.4}},
                   "unseen": {"inputs": 10, "metrics": {"BLEU": 0.3, "METEOR": 0.35, "TER": 0.6}}}}))
    out = tmp_path / "results.md"
    out.write_text("<!-- RESULTS -->\nmain\n<!-- /RESULTS -->\n<!-- RESULTS:webnlg -->\n<!-- /RESULTS:webnlg -->\n")
    assert main(["--row", "w", "-", str(ev), "--out", str(out), "--table", "webnlg", "--groups"]) == 0
    text = out.read_text()
    assert "main" in text  # the other table is untouched
    assert "| system | all: BLEU (inputs) | all: METEOR | all: TER | seen: BLEU (inputs) |" in text
    assert "| w | 50.0 (30) | 40.0 | 45.0 | 60.0 (20) | 42.0 | 40.0 | 30.0 (10) | 35.0 | 60.0 | - | - | greedy, q4, " \
           "30 inputs |" in text
    with pytest.raises(SystemExit):  # no such markers: refused, the file unchanged
        main(["--row", "w", "-", str(ev), "--out", str(out), "--table", "nope"])
    assert out.read_text() == text


def test_plot_groups_seeds_of_one_system(tmp_path):
    from trainer.results import plot, system_of

    assert system_of("low data: prefix-tuning, seed 1") == "low data: prefix-tuning" == system_of(
        "low data: prefix-tuning seed 12")
    assert system_of("prefix, 700 steps") == "prefix, 700 steps"
    rows = []
    for i, (bleu, ser) in enumerate([(0.5, 0.1), (0.6, 0.05), (0.4, 0.2)]):
        ev = tmp_path / f"e{i}"
        ev.mkdir()
        (ev / "metrics.json").write_text(json.dumps({"metrics": {"BLEU": bleu, "NIST": 5.0, "METEOR": 0.3,
                                                                 "ROUGE_L": 0.5, "CIDEr": 1.0, "SER": ser},
                                                     "num_beams": 1, "inputs": 3}))
        rows.append((["a, seed 0", "a, seed 1", "b"][i], "-", str(ev)))
    png = tmp_path / "p.png"
    assert main(["--plot", str(png), *[x for r in rows for x in ("--row", *r)]]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot(rows, png) == {"a": [(50.0, 10.0), (60.0, 5.0)], "b": [(40.0, 20.0)]}
