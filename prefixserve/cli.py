"""The `prefixserve` command: store management here; serve, keys and tenants from server/, train and evaluate from
trainer/ (this package sits above both, so neither imports the other)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from server import serve_cli
from server.settings import Settings
from server.tenants import cli as tenants_cli
from trainer import cli as trainer_cli

# Modules that add their own subcommands with register(subparsers).
_SUBCOMMANDS = (serve_cli, tenants_cli, trainer_cli)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help="store directory (env PREFIXSERVE_STORE)")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model id or directory (env PREFIXSERVE_MODEL)")


def cmd_import_peft(args: argparse.Namespace) -> int:
    """Validate a PEFT prefix/prompt-tuning or LoRA adapter against the model and store it under a task name."""
    from basemodel.convert import artifact_from_files
    from basemodel.model import load_model
    from prefix_store.backend import open_store
    from prefix_store.base import validate_task_name
    from prefix_store.peft_io import read_dir

    s = Settings.from_args(args)
    validate_task_name(args.task)
    loaded = load_model(s.model, device=s.device, dtype=s.dtype)
    art = artifact_from_files(read_dir(args.dir), loaded, max_bytes=s.max_upload_bytes,
                              description=args.description or "")
    manifest, tensors = art.to_bytes()
    stored = asyncio.run(open_store(s.store).put(args.task, art.manifest, tensors))
    print(json.dumps({"task": args.task, "version": stored.sha256, "prefix_length": stored.prefix_length,
                      "source": stored.source}))
    return 0


def peft_base_model(s: Settings) -> str:
    """What an exported adapter's base_model_name_or_path says: a path or hub id that PEFT's from_pretrained
    loads (the embedded model's converted directory, a local directory made absolute, a hub id as it is)."""
    from basemodel.model import resolve_model_path

    path = resolve_model_path(s.model, Path(s.cache_dir) if s.cache_dir else None)
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def cmd_export_peft(args: argparse.Namespace) -> int:
    """Write a stored task as a PEFT adapter directory: prefix tuning for a prefix, LoRA for a LoRA adapter."""
    from prefix_store.artifact import LORA_KIND, PrefixArtifact
    from prefix_store.backend import open_store
    from prefix_store.lora import export_peft_lora
    from prefix_store.peft_io import export_peft, write_dir

    s = Settings.from_args(args)
    manifest, tensors = asyncio.run(open_store(s.store).get(args.task))
    art = PrefixArtifact.from_bytes(manifest.to_json(), tensors, s.max_upload_bytes)
    export = export_peft_lora if art.manifest.kind == LORA_KIND else export_peft
    out = write_dir(export(art, base_model_name=peft_base_model(s)), args.out)
    print(out)
    return 0


def _size(n: int) -> str:
    """Bytes as a short human-readable size (1.2 MiB)."""
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Rows as left-aligned columns under a header (the last column is not padded)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    """List stored prefixes: a table, or one JSON object per line with --json."""
    from prefix_store.backend import open_store

    s = Settings.from_args(args)
    listing = asyncio.run(open_store(s.store).list())
    if args.json:
        for name, m in listing.items():
            print(json.dumps({"task": name, "version": m.sha256, "prefix_length": m.prefix_length,
                              "source": m.source, "nbytes": m.nbytes, "description": m.description}))
        return 0
    rows = [[name, m.sha256[:12], m.source, f"r={m.lora['r']}" if m.lora else str(m.prefix_length),
             _size(m.nbytes), m.description if len(m.description) <= 60 else m.description[:57] + "..."]
            for name, m in sorted(listing.items())]
    print(table(rows, ["TASK", "VERSION", "SOURCE", "TOKENS", "SIZE", "DESCRIPTION"]) if rows
          else f"no prefixes in {s.store}")
    return 0


def cmd_store_copy(args: argparse.Namespace) -> int:
    """Copy every prefix, version and alias from one store to another (disk <-> Redis); safe to run again."""
    from prefix_store.backend import open_store
    from prefix_store.copy import copy_store

    async def run() -> dict[str, object]:
        src, dst = open_store(args.src), open_store(args.dst)
        try:
            return {"src": src.url, "dst": dst.url, **vars(await copy_store(src, dst))}
        finally:
            await src.close()
            await dst.close()

    print(json.dumps(asyncio.run(run())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, including plugin subcommands."""
    parser = argparse.ArgumentParser(prog="prefixserve", description=__doc__)
    parser.add_argument("--log-level", default=None, help="logging level (env PREFIXSERVE_LOG_LEVEL, default info)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-peft", help="import a PEFT prefix/prompt-tuning or LoRA adapter into the store")
    p.add_argument("dir")
    p.add_argument("--task", required=True)
    p.add_argument("--description", default=None)
    _store_arg(p)
    _model_arg(p)
    p.set_defaults(func=cmd_import_peft)

    p = sub.add_parser("export-peft", help="export a stored task as a PEFT adapter (prefix tuning or LoRA)")
    p.add_argument("task")
    p.add_argument("out")
    _store_arg(p)
    _model_arg(p)
    p.set_defaults(func=cmd_export_peft)

    p = sub.add_parser("list", help="list stored prefixes (a table; --json: one JSON object per line)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    _store_arg(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("store", help="manage prefix stores")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    p = store_sub.add_parser("copy", help="copy all prefixes, versions and aliases from SRC to DST "
                             "(directory, file://, redis:// or rediss:// URLs)")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_store_copy)

    for module in _SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prefixserve` command."""
    args = build_parser().parse_args(argv)
    level = args.log_level or os.environ.get("PREFIXSERVE_LOG_LEVEL") or "info"
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"prefixserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
