"""Schemathesis over the real server's own /openapi.json, with every check it has (not only "no 5xx": documented
statuses, content types and headers, response schemas, schema-valid requests accepted and schema-invalid ones
refused, auth enforced where declared, ...), once with auth off and once with auth on (an admin key, so the admin
routes are reached too). Every operation gets generated requests, valid and invalid by the schema, bounded in
number. A failure names the operation, the check and the request. What is left out is exactly BY_DESIGN, the
context-length refusals of `_by_design` and, with auth off, `ignored_auth`: each is listed with its reason in
docs/api.md ("The OpenAPI schema")."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, is_check_class, load_all_checks

from tests.api.conftest import Server, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 10  # per operation and mode: each run (auth off, auth on) takes ~20 s here

load_all_checks()
ALL_CHECKS = [check for check in CHECKS.get_all() if not is_check_class(check)]
# Left out on purpose, each with its reason in docs/api.md ("The OpenAPI schema"):
BY_DESIGN = {
    # the uploaded files must be a PEFT adapter or the native format, which no schema can say: generated
    # files are refused with a 422 naming what was expected
    ("PUT /prefixes/{name}", "positive_data_acceptance"),
}
AUTH_OFF = {"ignored_auth"}  # auth is off while the store holds no keys (auth "auto"): nothing to enforce
GENERATION = {"POST /generate", "POST /generate_stream", "POST /", "POST /v1/completions", "POST /v1/chat/completions"}
# ... and failures of one case: a schema-valid prompt refused because prompt + max_new_tokens exceed the context
# (tokens of this model, --max-seq-len: known only when the request is tokenised), or ?task= and
# parameters.adapter_id both given and different (a rule across query and body, which OpenAPI cannot state)
REFUSED_BY_DESIGN = ("exceeds the maximum sequence length", "differs from ?task=")


def _by_design(label: str, failure: BaseException, response) -> bool:
    kind = type(failure).__name__
    if kind == "RejectedPositiveData":
        return label in GENERATION and response.status_code == 422 and any(m in response.text
                                                                            for m in REFUSED_BY_DESIGN)
    if kind == "AcceptedNegativeData":  # a query parameter sent several times: the server reads its last value
        return any(len(v) > 1 for v in parse_qs(urlsplit(response.request.url).query).values())
    return False


@pytest.fixture(scope="module", params=["auth off", "auth on"])
def fuzzed(request, model_dir, tmp_path_factory) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server with short contexts and deadlines; with auth on, an admin key made with the CLI before it starts
    (the headers that carry it are returned)."""
    work = tmp_path_factory.mktemp("fuzz")
    headers: dict[str, str] = {}
    if request.param == "auth on":
        made = subprocess.run([sys.executable, "-m", "prefixserve.cli", "keys", "create", "--tenant", "ops",
                               "--admin", "--store", str(work / "store")],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert made.returncode == 0, made.stderr
        headers = {"Authorization": f"Bearer {made.stdout.strip().splitlines()[-1]}"}
    s = start_server(model_dir, work, max_seq_len=64, max_new_tokens_default=4, max_batch_size=8,
                     request_timeout_s=20, max_upload_bytes=256 * 1024)
    yield s, headers
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def _operations(url: str):
    """Every operation of the server's schema (a schema error fails the test)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")  # requests go to the same origin
    return [result.ok() for result in schema.get_all_operations()]


def _checks(label: str, auth_on: bool) -> list:
    return [check for check in ALL_CHECKS if (label, check.__name__) not in BY_DESIGN
            and (auth_on or check.__name__ not in AUTH_OFF)]


def test_every_check_passes(fuzzed):
    """Schemathesis' pytest plugin does not load under pytest 9, so each operation's case strategy is driven here
    with hypothesis directly (same generator, same cases) and each response goes through every check."""
    server, headers = fuzzed
    ops = _operations(server.url)
    assert len(ops) >= 15, [op.label for op in ops]
    seen: list[int] = []
    failures: list[str] = []

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for op in ops:
            checks = _checks(op.label, auth_on=bool(headers))

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            def fuzz(case):
                if headers:  # the key replaces any generated Authorization, in the case too: a negative case
                    case.headers = {**(case.headers or {}), **headers}  # whose only fault was there is valid
                response = case.call(headers=headers, timeout=60)
                seen.append(response.status_code)
                try:
                    case.validate_response(response, checks=checks, headers=headers)
                except BaseException as e:  # schemathesis' FailureGroup, one per case: all are reported at the end
                    if not hasattr(e, "exceptions"):
                        raise
                    if not all(_by_design(op.label, f, response) for f in e.exceptions):
                        failures.append(f"[{mode.value}] {op.label}: {str(e)[:1500]}")

            try:
                fuzz()
            except Unsatisfiable:  # nothing to get wrong: no parameters or body (GET /health), so no negative cases
                assert mode == GenerationMode.NEGATIVE, op.label
            assert server.proc.poll() is None, server.log.read_text()[-4000:]
    assert not failures, f"{len(failures)} failing cases:\n\n" + "\n\n".join(failures[:20])
    assert len(seen) >= len(ops) and any(code < 300 for code in seen)
    assert not [code for code in seen if code >= 500]


def test_unsupported_methods_get_405_with_allow(fuzzed):
    """A method a path does not have (OPTIONS, or one of GET/POST/PUT/PATCH/DELETE it lacks) is a 405 whose `Allow`
    lists exactly the path's methods in the schema (HEAD aside), whatever the key."""
    server, headers = fuzzed
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    with server.client(headers=headers) as c:
        for path, item in paths.items():
            declared = {m.upper() for m in item}
            url = path.replace("{name}", "t").replace("{key_id}", "0123456789ab")
            for method in ["OPTIONS", *sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - declared)]:
                r = c.request(method, url)
                assert r.status_code == 405, (method, path, r.status_code, r.text[:300])
                allow = {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}
                assert allow - {"HEAD"} == declared, (method, path, r.headers.get("allow"))


def test_server_still_serves_after_the_fuzz(fuzzed):
    server, headers = fuzzed
    with server.client(headers=headers) as c:
        assert c.get("/health").status_code == 200
        assert c.post("/generate", json={"inputs": "still here", "parameters": {"max_new_tokens": 2}}
                      ).status_code == 200
        assert 'status="500"' not in c.get("/metrics").text
    assert "Traceback" not in server.log.read_text()
