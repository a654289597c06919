"""The async client against the real server: generation, streaming, prefixes, errors, concurrency."""
from __future__ import annotations

import asyncio

import pytest

from prefixserve_client import AsyncClient, NotFoundError

PROMPT = "name : Zizzi | Type : pub"


async def test_async_end_to_end(live, adapters, tmp_path):
    async with AsyncClient(live.url, timeout=60) as c:
        assert (await c.health())["status"] == "ok" and (await c.ready())["status"] == "ready"
        info = await c.upload("acl", adapters["a"])
        assert (await c.get("acl")).version == info.version
        assert "acl" in [p.task for p in await c.list()]
        assert "acl" in [m.id for m in await c.models()]

        r = await c.generate(PROMPT, "acl", max_new_tokens=5, details=True)
        assert r.version == info.version and r.details.generated_tokens == 5
        stream = c.stream(PROMPT, "acl", max_new_tokens=5)
        ids = [ev.token.id async for ev in stream]
        assert ids == [t.id for t in r.details.tokens] and stream.response.generated_text == r.generated_text
        assert "".join([t async for t in c.stream(PROMPT, "acl", max_new_tokens=5).text()]) == r.generated_text

        # concurrent requests batch on the server and each equals the request alone (greedy)
        many = await asyncio.gather(*(c.generate(PROMPT, "acl", max_new_tokens=5) for _ in range(6)))
        assert {m.generated_text for m in many} == {r.generated_text}

        comp = await c.completion(PROMPT, model="acl", max_tokens=5, temperature=0)
        assert comp.choices[0].text == r.generated_text
        chunks = [ch async for ch in c.stream_completion(PROMPT, model="acl", max_tokens=5, temperature=0)]
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.generated_text
        chat = await c.chat([{"role": "user", "content": "hi"}], model="acl", max_tokens=3, temperature=0)
        assert chat.choices[0].message.role == "assistant"

        files = await c.download_to("acl", tmp_path / "native")
        assert len(files) == 2 and len(await c.download("acl", file="prefix.safetensors")) > 0
        assert "prefixserve_requests" in await c.metrics()
        assert (await c.delete("acl")).deleted == info.version
        with pytest.raises(NotFoundError, match="acl"):
            await c.generate(PROMPT, "acl")
