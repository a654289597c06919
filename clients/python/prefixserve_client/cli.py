"""`prefixctl`: the command line over `Client` (generate, stream, upload, list, get, download, delete, versions,
rollback, models). The server is --url or $PREFIXSERVE_URL; the key --api-key or $PREFIXSERVE_API_KEY."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from prefixserve_client import _core as core
from prefixserve_client.client import DEFAULT_URL, Client
from prefixserve_client.errors import PrefixServeError


def _dump(obj: Any) -> None:
    data = [o.model_dump() for o in obj] if isinstance(obj, list) else obj.model_dump()
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _gen_params(a: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                seed=a.seed, stop=a.stop or None)


def cmd_generate(c: Client, a: argparse.Namespace) -> None:
    """Print the generated text (or the whole response with --json)."""
    r = c.generate(a.prompt, a.task, details=a.json, **_gen_params(a))
    if a.json:
        _dump(r)
    else:
        sys.stdout.write(r.generated_text + "\n")


def cmd_stream(c: Client, a: argparse.Namespace) -> None:
    """Print tokens as they arrive."""
    stream = c.stream(a.prompt, a.task, **_gen_params(a))
    for text in stream.text():
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if a.json and stream.response is not None:
        _dump(stream.response)


def cmd_upload(c: Client, a: argparse.Namespace) -> None:
    """Upload a PEFT or native directory (or a downloaded zip)."""
    info = c.upload(a.name, a.source, description=a.description)
    sys.stdout.write(f"{info.task} {info.version}\n")


def cmd_list(c: Client, a: argparse.Namespace) -> None:
    """One line per prefix: task, version, virtual tokens, source."""
    prefixes = c.list()
    if a.json:
        _dump(prefixes)
        return
    for p in prefixes:
        sys.stdout.write(f"{p.task}\t{p.version[:12]}\t{p.prefix_length}\t{p.manifest.get('source', '')}\n")


def cmd_get(c: Client, a: argparse.Namespace) -> None:
    """Print one prefix's manifest as JSON."""
    _dump(c.get(a.name))


def cmd_download(c: Client, a: argparse.Namespace) -> None:
    """Save the artifact: a zip (default NAME.zip), one file (--file), or extracted files (--extract DIR)."""
    if a.extract:
        for path in c.download_to(a.name, a.extract):
            sys.stdout.write(f"{path}\n")
        return
    out = Path(a.out or (a.file or f"{a.name}.zip"))
    out.write_bytes(c.download(a.name, a.file))
    sys.stdout.write(f"{out}\n")


def cmd_delete(c: Client, a: argparse.Namespace) -> None:
    """Delete a prefix."""
    r = c.delete(a.name)
    sys.stdout.write(f"deleted {r.task} {r.deleted}\n")


def cmd_versions(c: Client, a: argparse.Namespace) -> None:
    """List a task's versions (servers with versions, issue 4)."""
    _dump(c.versions(a.name))


def cmd_rollback(c: Client, a: argparse.Namespace) -> None:
    """Move a task back to a version (servers with versions, issue 4)."""
    info = c.rollback(a.name, a.version)
    sys.stdout.write(f"{info.task} {info.version}\n")


def cmd_models(c: Client, a: argparse.Namespace) -> None:
    """List /v1/models ids."""
    for m in c.models():
        sys.stdout.write(f"{m.id}\n")


def _gen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--task", "-t", help="task (prefix) name; none = the base model")
    p.add_argument("--max-new-tokens", "-n", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print the whole response with details")


def build_parser() -> argparse.ArgumentParser:
    """The prefixctl argument parser."""
    p = argparse.ArgumentParser(prog="prefixctl", description=__doc__)
    p.add_argument("--url", default=os.environ.get("PREFIXSERVE_URL", DEFAULT_URL))
    p.add_argument("--api-key", default=os.environ.get("PREFIXSERVE_API_KEY"))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries on 429/503/refused connections")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("generate", cmd_generate), ("stream", cmd_stream)):
        _gen_flags(sp := sub.add_parser(name, help=fn.__doc__))
        sp.set_defaults(func=fn)
    sp = sub.add_parser("upload", help=cmd_upload.__doc__)
    sp.add_argument("name")
    sp.add_argument("source", help="PEFT adapter dir, native artifact dir, or a zip from download")
    sp.add_argument("--description")
    sp.set_defaults(func=cmd_upload)
    sp = sub.add_parser("list", help=cmd_list.__doc__)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("download", help=cmd_download.__doc__)
    sp.add_argument("name")
    sp.add_argument("--file", choices=core.NATIVE_FILES)
    sp.add_argument("--out", "-o")
    sp.add_argument("--extract", metavar="DIR")
    sp.set_defaults(func=cmd_download)
    for name, fn in (("get", cmd_get), ("delete", cmd_delete), ("versions", cmd_versions)):
        sp = sub.add_parser(name, help=fn.__doc__)
        sp.add_argument("name")
        sp.set_defaults(func=fn)
    sp = sub.add_parser("rollback", help=cmd_rollback.__doc__)
    sp.add_argument("name")
    sp.add_argument("version")
    sp.set_defaults(func=cmd_rollback)
    sub.add_parser("models", help=cmd_models.__doc__).set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run prefixctl; exit 0 on success, 1 on a server or connection error, 2 on bad arguments."""
    a = build_parser().parse_args(argv)
    retry = core.RetryPolicy(max_attempts=max(1, a.retries + 1))
    try:
        with Client(a.url, api_key=a.api_key, timeout=a.timeout, retry=retry) as client:
            a.func(client, a)
    except PrefixServeError as e:
        sys.stderr.write(f"prefixctl: {e}\n")
        return 1
    except (OSError, ValueError) as e:
        sys.stderr.write(f"prefixctl: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
