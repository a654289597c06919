"""Build docs/results.md from training run directories (summary.json) and evaluations (metrics.json).

Usage: python -m trainer.results --row LABEL RUN_DIR EVAL_DIR [--row ...] --out docs/results.md [--update]
                                 [--table NAME] [--groups] [--plot PNG]
       python -m trainer.results --manifest ARTIFACT_DIR --score LABEL EVAL_DIR [--score ...]
RUN_DIR may be '-' for rows without training (the untuned model). Only measured numbers are written; the paper's
GPT-2 medium numbers are printed beside them for context. With --update, the rows already in --out stay (a row with
the same label is replaced), so rows measured in different sessions need not all be re-run to add one. --table NAME
writes between `<!-- RESULTS:NAME -->` markers instead (several tables in one file); --groups makes a table of BLEU,
METEOR and TER over all inputs and each group of them (WebNLG's seen and unseen categories).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from prefix_store.artifact import load_dir, save_dir
from trainer.plots import saved_figure

PAPER = [  # Li & Liang (2021), Table 1, E2E test, GPT-2 medium (full E2E training set)
    ("paper: prefix-tuning, GPT-2 medium", 69.7, 8.81, 46.1, 71.4, 2.49),
    ("paper: fine-tuning, GPT-2 medium", 68.2, 8.62, 46.2, 71.0, 2.47),
]


def _fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def _training(s: dict) -> str:
    if not s:
        return "-"
    cpu = f", CPU {s['cpu_seconds'] / 60:.0f} min" if "cpu_seconds" in s else ""
    return f"{s['steps']} steps, {s['train_seconds'] / 60:.0f} min wall{cpu}"


def _machine(s: dict) -> str:
    m = s.get("machine")
    return f"{m['cpu']}, {m['torch_threads']} thread{'s' * (m['torch_threads'] != 1)}" if m else "-"


def _load(run_dir: str, eval_dir: str) -> tuple[dict, dict]:
    """An evaluation's metrics.json and its run's summary.json ({} for '-', rows without training)."""
    ev = json.loads((Path(eval_dir) / "metrics.json").read_text())
    return ev, json.loads((Path(run_dir) / "summary.json").read_text()) if run_dir != "-" else {}


def row(label: str, run_dir: str, eval_dir: str) -> str:
    """One markdown table row from a run and its evaluation."""
    ev, s = _load(run_dir, eval_dir)
    m = ev["metrics"]
    trained = f"{100 * s['trained_share']:.3f}%" if s else "0"
    stored = f"{100 * s['stored_share']:.4f}%" if s else "0"
    return (f"| {label} | {_fmt(m['BLEU'], 100, 1)} | {_fmt(m['NIST'])} | {_fmt(m['METEOR'], 100, 1)} | "
            f"{_fmt(m['ROUGE_L'], 100, 1)} | {_fmt(m['CIDEr'])} | {_fmt(m.get('SER'), 100, 1)} | {trained} | "
            f"{stored} | {_training(s)} | {_machine(s)} | {_decoding(ev)}, {ev['inputs']} MRs |")


def _decoding(ev: dict) -> str:
    dec = "greedy" if ev["num_beams"] == 1 else f"beam {ev['num_beams']}"
    q4 = ", q4" if ev.get("quantization") == "q4" else ""
    return dec + q4 + (", must_include" if ev.get("must_include") else "")


GROUP_METRICS = (("BLEU", 100, 1), ("METEOR", 100, 1), ("TER", 100, 1))


def group_row(label: str, run_dir: str, eval_dir: str) -> str:
    """One row of a --groups table: BLEU, METEOR, TER over all inputs, then over each group (sorted by name)."""
    ev, s = _load(run_dir, eval_dir)
    cells = []
    for part in [ev, *(ev.get("groups", {})[g] for g in sorted(ev.get("groups", {})))]:
        m = part["metrics"]
        cells += [_fmt(m.get(k), scale, digits) for k, scale, digits in GROUP_METRICS]
        cells[-3] += f" ({part['inputs']})"
    return (f"| {label} | {' | '.join(cells)} | {_training(s)} | {_machine(s)} | {_decoding(ev)}, "
            f"{ev['inputs']} inputs |")


def group_table(rows: list[tuple[str, str, str]], kept: list[str] = ()) -> str:
    """The --groups table; the groups are those of the first new row's evaluation."""
    ev = json.loads((Path(rows[0][2]) / "metrics.json").read_text()) if rows else {}
    names = ["all", *sorted(ev.get("groups", {}))]
    head = ("| system | " + " | ".join(f"{n}: {k}" + (" (inputs)" if k == "BLEU" else "")
                                       for n in names for k, _, _ in GROUP_METRICS)
            + " | training | machine | decoding |\n|" + "---|" * (3 * len(names) + 4))
    return "\n".join([head, *_merge(kept, {label: group_row(label, run, e) for label, run, e in rows})])


def _label(line: str) -> str:
    return line.split("|")[1].strip()


def _merge(kept: list[str], new: dict[str, str]) -> list[str]:
    """The kept rows, each replaced by the new row of its label, then the other new rows."""
    new = dict(new)
    return [new.pop(_label(line), line) for line in kept] + list(new.values())


def table(rows: list[tuple[str, str, str]], kept: list[str] = ()) -> str:
    """The results table: `kept` rows (markdown lines) with same-label rows replaced, new rows appended, then the
    paper's rows for context."""
    head = ("| system | BLEU | NIST | METEOR | ROUGE-L | CIDEr | SER % | params trained | params stored | training | "
            "machine | decoding, test MRs |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    ours = _merge(kept, {label: row(label, run, ev) for label, run, ev in rows})
    paper = [f"| {p[0]} | {p[1]} | {p[2]} | {p[3]} | {p[4]} | {p[5]} | | | | | | beam 5, 630 MRs |" for p in PAPER]
    return "\n".join([head, *ours, *paper])


def system_of(label: str) -> str:
    """A row's system: its label without a trailing "seed N" (rows of one system, several seeds)."""
    return re.sub(r",?\s*seed \d+$", "", label)


def plot(rows: list[tuple[str, str, str]], png: str | Path) -> dict[str, list[tuple[float, float]]]:
    """BLEU and SER of each system as a PNG: one dot per row (seed), a bar at the systems' mean. Returns the
    (BLEU, SER) points per system, in percent."""
    points: dict[str, list[tuple[float, float]]] = {}
    for label, run_dir, eval_dir in rows:
        m = _load(run_dir, eval_dir)[0]["metrics"]
        ser = m.get("SER")  # None (not E2E): no dot
        points.setdefault(system_of(label), []).append((100 * m["BLEU"], float("nan") if ser is None else 100 * ser))
    with saved_figure(png, 1, 2, figsize=(9, 0.6 * len(points) + 1.6), sharey=True) as (fig, axes):
        for k, (ax, name) in enumerate(zip(axes, ("BLEU", "slot error rate (%)"))):
            for y, pts in enumerate(points.values()):
                vals = [p[k] for p in pts if p[k] == p[k]]
                if not vals:
                    continue
                ax.scatter(vals, [y] * len(vals), color="C0", zorder=3)
                ax.plot([sum(vals) / len(vals)] * 2, [y - 0.3, y + 0.3], color="C1", linewidth=2)
            ax.set_xlabel(name + (" (higher is better)" if k == 0 else " (lower is better)"))
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(range(len(points)), list(points))
        axes[0].invert_yaxis()
        fig.suptitle("dots: one run (seed) each; bars: their mean", fontsize=9)
    return points


def record_scores(artifact_dir: str | Path, evals: list[tuple[str, str]]) -> dict:
    """Write evaluations into an artifact's manifest (`extra.scores`, keyed by label: metrics, slot errors, groups,
    decoding, inputs); the tensors and their hash are untouched. Returns the scores written."""
    art = load_dir(artifact_dir)
    scores = dict(art.manifest.extra.get("scores", {}))
    for label, eval_dir in evals:
        ev = json.loads((Path(eval_dir) / "metrics.json").read_text())
        scores[label] = {k: ev[k] for k in ("metrics", "slot_errors", "groups", "num_beams", "max_new_tokens",
                                            "inputs") if k in ev}
    art.manifest.extra["scores"] = scores
    save_dir(art, artifact_dir)
    return scores


def main(argv: list[str] | None = None) -> int:
    """Print (or write with --out) the results table."""
    ap = argparse.ArgumentParser(prog="python -m trainer.results")
    ap.add_argument("--row", nargs=3, action="append", metavar=("LABEL", "RUN_DIR", "EVAL_DIR"), default=[])
    ap.add_argument("--out", help="write the table into this markdown file between the RESULTS markers")
    ap.add_argument("--update", action="store_true", help="keep the rows already in --out (same label: replaced)")
    ap.add_argument("--table", default="", help="write between <!-- RESULTS:NAME --> markers (default: RESULTS)")
    ap.add_argument("--groups", action="store_true", help="BLEU, METEOR, TER over all inputs and per group")
    ap.add_argument("--manifest", help="instead: write --score evaluations into this artifact directory's manifest")
    ap.add_argument("--score", nargs=2, action="append", metavar=("LABEL", "EVAL_DIR"), default=[])
    ap.add_argument("--plot", metavar="PNG", help="also draw the --row systems' BLEU and SER (rows whose labels end "
                                                  "in 'seed N' as one system) into this PNG")
    args = ap.parse_args(argv)
    if args.plot:
        plot([tuple(r) for r in args.row], args.plot)
    if args.manifest:
        print(json.dumps(record_scores(args.manifest, [tuple(x) for x in args.score]), indent=1))
        return 0
    p = Path(args.out) if args.out else None
    name = f"RESULTS:{args.table}" if args.table else "RESULTS"
    begin, stop = f"<!-- {name} -->", f"<!-- /{name} -->"
    doc = p.read_text() if p and p.exists() else f"{begin}\n{stop}\n"
    if begin not in doc or stop not in doc:
        ap.error(f"{p} has no {begin} ... {stop} markers")
    start, end = doc.index(begin), doc.index(stop)
    paper = {entry[0] for entry in PAPER}
    kept = [line for line in doc[start:end].splitlines()[3:] if line.startswith("| ") and _label(line) not in paper]
    rows = [tuple(r) for r in args.row]
    text = (group_table if args.groups else table)(rows, kept if args.update else [])
    if not p:
        print(text)
        return 0
    p.write_text(doc[:start] + begin + "\n" + text + "\n" + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
