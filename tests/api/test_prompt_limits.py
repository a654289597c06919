"""Long prompts do not stall the server: prompt text past --max-prompt-bytes is refused with a 413 naming the field
before any tokenisation, and prompts under it are tokenised off the event loop, so /health answers while several
~1 MB prompts are tokenised (the latency bound comes from a baseline measured in the same test). The cap applies to a
request the schema accepts: it is checked after the body is parsed and validated (a /v1/* body without `model` is
the 422 naming `model`, which costs no tokenisation either) and before the prompt is tokenised."""
from __future__ import annotations

import asyncio
import signal
import statistics
import time
from typing import Any, Iterator

import httpx
import pytest

from server.api.errors import APIError
from server.api.tokenize import Tokenizing
from tests.api.conftest import Server, error_of, start_server, stop_server
from tests.tiny import gpt2_tokenizer

MB_TEXT = ("name : The Eagle | Type : coffee shop | food : French | area : riverside\n" * 14_000)[:1_000_000]
MODEL = "tiny-gpt2"  # the test model's id: the base model, no task (/v1/* requires `model`)
PROMPT_ROUTES = [  # (path, body with the prompt in it, the field the refusal names)
    ("/generate", {"inputs": MB_TEXT}, "inputs"),
    ("/generate_stream", {"inputs": MB_TEXT}, "inputs"),
    ("/", {"inputs": MB_TEXT, "stream": False}, "inputs"),
    ("/v1/completions", {"model": MODEL, "prompt": MB_TEXT, "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["short", MB_TEXT[:300_000]], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": MB_TEXT}], "max_tokens": 2},
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                        "text": MB_TEXT}]}],
                              "max_tokens": 2}, "messages"),
]


class CountingTokenizer:
    """GPT-2's real tokenizer, counting the calls that tokenise or render text."""

    def __init__(self) -> None:
        self.tok, self.calls = gpt2_tokenizer(), 0
        self.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def __call__(self, text: str, **kw: Any) -> Any:
        self.calls += 1
        return self.tok(text, **kw)

    def apply_chat_template(self, convo: list[dict], **kw: Any) -> str:
        self.calls += 1
        return self.tok.apply_chat_template(convo, chat_template=self.chat_template, **kw)


async def test_over_the_cap_refused_before_any_tokenisation():
    counting = CountingTokenizer()
    t = Tokenizing(counting, max_prompt_bytes=1000)
    try:
        for call in (t.encode("é" * 501), t.encode_many(["a" * 600, "b" * 401], "prompt"),
                     t.encode_chat([{"role": "user", "content": "x" * 1001}])):
            with pytest.raises(APIError) as e:
                await call
            assert e.value.status == 413 and "--max-prompt-bytes" in e.value.message
        assert counting.calls == 0
        assert await t.encode("é" * 500) == counting.tok("é" * 500)["input_ids"]  # 1000 bytes: at the cap, served
        assert await t.encode_chat([{"role": "user", "content": "hi"}]) == counting.tok("hi")["input_ids"]
        assert counting.calls == 3
    finally:
        t.close()


@pytest.mark.parametrize("path,body,field", PROMPT_ROUTES)
def test_prompt_over_the_cap_413_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 413, r.text
    message, error_type = error_of(r)
    assert message.startswith(f"{field}: ") and "--max-prompt-bytes" in message and error_type == "too_large"
    if path.startswith("/v1/"):
        assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("path,body", [(p, b) for p, b, _ in PROMPT_ROUTES if p.startswith("/v1/")])
def test_body_the_schema_refuses_is_422_before_the_prompt_cap(http, path, body):
    """Schema first, then the prompt cap: an oversized prompt without `model` is the 422 naming `model` (the body is
    parsed either way, and neither answer tokenises anything)."""
    r = http.post(path, json={k: v for k, v in body.items() if k != "model"})
    assert r.status_code == 422, r.text
    assert error_of(r) == ("model: Field required", "validation")


@pytest.fixture(scope="module")
def roomy(model_dir, tmp_path_factory) -> Iterator[Server]:
    """A server that takes 1 MB prompts as far as the tokenizer (and refuses them for their token count)."""
    s = start_server(model_dir, tmp_path_factory.mktemp("roomy"), max_body_bytes=4 * 2**20,
                     max_prompt_bytes=2 * 2**20, max_seq_len=256)
    yield s
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


async def _health_latencies(c: httpx.AsyncClient, until: asyncio.Future | None, count: int = 0) -> list[float]:
    """Seconds each /health took, asked one after another (`count` of them, or until `until` is done)."""
    out: list[float] = []
    while (until is not None and not until.done()) or len(out) < count:
        start = time.perf_counter()
        assert (await c.get("/health")).status_code == 200
        out.append(time.perf_counter() - start)
        await asyncio.sleep(0.005)
    return out


async def test_health_answers_while_megabyte_prompts_are_tokenised(roomy):
    async with httpx.AsyncClient(base_url=roomy.url, timeout=120) as c:
        await _health_latencies(c, None, 10)  # warm the connection
        baseline = await _health_latencies(c, None, 40)
        started = time.perf_counter()
        big = asyncio.ensure_future(asyncio.gather(
            *(c.post(path, json=body) for path, body, _ in PROMPT_ROUTES[:4])))
        during = await _health_latencies(c, big, 0)
        burst = time.perf_counter() - started
        answers = await big
    for r in answers:  # tokenised, then refused for their length in tokens: a clear 422 each
        assert r.status_code == 422 and "tokens" in error_of(r)[0], r.text
    bound = max(0.5, 20 * statistics.median(baseline), 2 * max(baseline))
    assert len(during) >= 5, (burst, during)  # /health kept answering all through the burst
    assert max(during) < bound, (max(during), bound, statistics.median(baseline), burst)
    assert max(during) < burst / 4  # on the event loop, one probe would have waited for a whole prompt
