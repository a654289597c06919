"""The sync client against the real server: every method, streaming, errors with the server's message."""
from __future__ import annotations

import io
import zipfile

import pytest

from prefixserve_client import (BadRequestError, Client, GenerateResponse, NotFoundError, PrefixInfo,
                                StreamEvent)

PROMPT = "name : Zizzi | Type : pub"


@pytest.fixture()
def client(live):
    with Client(live.url, timeout=60) as c:
        yield c


def test_health_ready_metrics(client):
    assert client.health() == {"status": "ok"}
    assert client.ready()["status"] == "ready"
    assert "prefixserve_queue_depth" in client.metrics()


def test_prefix_lifecycle(client, adapters, tmp_path):
    info = client.upload("cl-life", adapters["a"], description="first")
    assert isinstance(info, PrefixInfo) and info.task == "cl-life" and len(info.version) == 64
    assert info.prefix_length == 4
    assert client.get("cl-life").version == info.version
    assert "cl-life" in [p.task for p in client.list()]
    assert "cl-life" in [m.id for m in client.models()]

    # download: zip, one file, extracted directory; the extracted native artifact re-uploads to the same version
    with zipfile.ZipFile(io.BytesIO(client.download("cl-life"))) as z:
        assert sorted(z.namelist()) == ["manifest.json", "prefix.safetensors"]
    assert b'"prefix_length"' in client.download("cl-life", file="manifest.json")
    files = client.download_to("cl-life", tmp_path / "native")
    assert sorted(p.name for p in files) == ["manifest.json", "prefix.safetensors"]
    assert client.upload("cl-copy", tmp_path / "native").version == info.version
    (tmp_path / "art.zip").write_bytes(client.download("cl-life"))
    assert client.upload("cl-zip", tmp_path / "art.zip").version == info.version

    replaced = client.upload("cl-life", adapters["b"])
    assert replaced.version != info.version
    assert client.generate(PROMPT, "cl-life", max_new_tokens=2).version == replaced.version

    for name in ("cl-life", "cl-copy", "cl-zip"):
        assert client.delete(name).task == name
    with pytest.raises(NotFoundError) as e:
        client.get("cl-life")
    assert e.value.status == 404 and e.value.error_type == "not_found" and "cl-life" in e.value.message


def test_generate_and_stream_agree(client, adapters):
    info = client.upload("cl-gen", adapters["a"])
    r = client.generate(PROMPT, "cl-gen", max_new_tokens=6, details=True)
    assert isinstance(r, GenerateResponse) and r.version == info.version
    assert r.details is not None and r.details.generated_tokens == len(r.details.tokens) == 6
    assert r.details.finish_reason == "length"

    stream = client.stream(PROMPT, "cl-gen", max_new_tokens=6)
    events = list(stream)
    assert all(isinstance(e, StreamEvent) for e in events) and len(events) == 6
    assert [e.token.id for e in events] == [t.id for t in r.details.tokens]
    assert stream.response is not None and stream.response.generated_text == r.generated_text
    assert stream.version == info.version and stream.response.details.generated_tokens == 6
    assert "".join(client.stream(PROMPT, "cl-gen", max_new_tokens=6).text()) == r.generated_text

    base = client.generate(PROMPT, max_new_tokens=6)  # no task: the bare base model
    assert base.version is None and base.details is None
    client.delete("cl-gen")


def test_openai_style(client, adapters):
    client.upload("cl-oai", adapters["a"])
    tgi = client.generate(PROMPT, "cl-oai", max_new_tokens=5).generated_text
    c = client.completion(PROMPT, model="cl-oai", max_tokens=5, temperature=0)
    assert c.choices[0].text == tgi and c.usage is not None and c.usage.completion_tokens == 5
    chunks = list(client.stream_completion(PROMPT, model="cl-oai", max_tokens=5, temperature=0))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == tgi
    two = client.completion([PROMPT, "name : Eagle"], model="cl-oai", max_tokens=3, temperature=0)
    assert len(two.choices) == 2
    chat = client.chat([{"role": "user", "content": "hi"}], model="cl-oai", max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    client.delete("cl-oai")


def test_errors_carry_the_server_message(client, tmp_path):
    with pytest.raises(NotFoundError, match="no-such-task"):
        client.generate(PROMPT, "no-such-task")
    with pytest.raises(NotFoundError) as e:  # OpenAI's error shape on /v1/*: the same fields
        client.completion(PROMPT, model="no-such-task")
    assert e.value.error_type == "not_found" and e.value.message == "no prefix named 'no-such-task'"
    with pytest.raises(BadRequestError) as e:
        client.generate(PROMPT, max_new_tokens=0)
    assert e.value.status == 422 and e.value.error_type == "validation" and "max_new_tokens" in e.value.message
    with pytest.raises(BadRequestError) as e:
        client.upload("bad", {"manifest.json": b"{}", "prefix.safetensors": b"junk"})
    assert 400 <= e.value.status < 500
    with pytest.raises(ValueError, match="adapter_config.json"):
        client.upload("bad", tmp_path)  # an empty directory: refused before sending
    with pytest.raises(NotFoundError):
        list(client.stream(PROMPT, "no-such-task"))


def test_versions_and_rollback(client, adapters):
    first = client.upload("cl-ver", adapters["a"])
    second = client.upload("cl-ver", adapters["b"])
    versions = [v.version for v in client.versions("cl-ver")]
    assert first.version in versions and second.version in versions
    assert client.rollback("cl-ver", first.version).version == first.version
    assert client.get("cl-ver").version == first.version
    client.delete("cl-ver")
