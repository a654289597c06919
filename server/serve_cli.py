"""`prefixserve serve`: one flag per Settings field (each also the env var PREFIXSERVE_<FIELD>), then uvicorn."""
from __future__ import annotations

import argparse
import logging
import socket
import types
import typing
from typing import Any

from server.settings import Settings

logger = logging.getLogger(__name__)


def _flag_type(annotation: Any) -> Any:
    """The argparse type of a Settings field (`int | None` -> int)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) and args else annotation
    return base if base in (int, float, str) else str


def _help(name: str, f: Any) -> str:
    """A field's --help: its description, its default ('' shown as quotes; a None default is described in the
    description itself) and its environment variable."""
    value = f.default_factory() if f.default_factory is not None else f.default
    shown = "" if value is None else f"default: {value!r}; " if value == "" else f"default: {value}; "
    return f"{f.description} ({shown}env PREFIXSERVE_{name.upper()})"


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """--<field> for every Settings field; unset flags leave the env var / default in charge."""
    for name, f in Settings.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_flag_type(f.annotation),
                       default=argparse.SUPPRESS, help=_help(name, f))


def cmd_serve(args: argparse.Namespace) -> int:
    """Build the app and serve it with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from server.app import create_app
    from server.connections import ConnectionLimits, guarded_protocol

    s = Settings.from_args(args)
    logging.getLogger().setLevel(s.log_level.upper())
    protocol = guarded_protocol(ConnectionLimits(s.header_timeout_s, s.max_connections))
    app = create_app(s)
    config = uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level.lower(),
                            timeout_graceful_shutdown=int(s.shutdown_timeout) or None, access_log=False,
                            http=protocol, timeout_keep_alive=s.idle_timeout_s)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    app.state.request_shutdown = lambda: setattr(server, "should_exit", True)  # drain, then stop (app.py)
    server.run(sockets=[listening_socket(s)] if s.send_buffer_bytes else None)
    return app.state.exit_code  # non-zero when the engine died


def listening_socket(s: Settings) -> socket.socket:
    """A socket bound to host:port whose accepted connections inherit SO_SNDBUF = send_buffer_bytes."""
    family, kind, proto, _, address = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.send_buffer_bytes)
    sock.bind(address)
    return sock


def register(sub: Any) -> None:
    """Add the `serve` subcommand to the `prefixserve` CLI."""
    p = sub.add_parser("serve", help="start the HTTP server", description=__doc__)
    add_settings_flags(p)
    p.set_defaults(func=cmd_serve)
