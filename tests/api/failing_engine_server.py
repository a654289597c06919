"""`python -m tests.api.failing_engine_server serve ...`: the real server, with one fault injected into its engine:
a step holding a request whose prompt contains the token id KILL_TOKEN fails outside any row's work (as a bug in
the engine's bookkeeping would), which must take the engine down and make the process exit non-zero."""
from __future__ import annotations

import sys

from prefixserve.cli import main
from server.engine.engine import Engine

KILL_TOKEN = 31337
_real_update = Engine._update


def _update(self, rows, logits):
    if any(KILL_TOKEN in r.request.prompt_ids for r in rows):
        raise AssertionError("injected engine failure")
    _real_update(self, rows, logits)


Engine._update = _update

if __name__ == "__main__":
    sys.exit(main())
