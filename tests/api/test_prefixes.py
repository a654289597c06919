"""Prefix upload, replace, list, get, download and delete through HTTP."""
from __future__ import annotations

import io
import json
import zipfile

from tests.api.conftest import peft_adapter, upload

GEN = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 6, "details": True}}


def _gen(http, task: str, body=GEN):
    r = http.post(f"/generate?task={task}", json=body)
    assert r.status_code == 200, r.text
    return r.headers["X-Prefix-Version"], [t["id"] for t in r.json()["details"]["tokens"]]


def test_upload_generate_replace_delete(http):
    first = upload(http, "cycle", peft_adapter(seed=10))
    assert first.status_code == 201 and first.json()["manifest"]["source"] == "peft:prefix_tuning"
    v1, out1 = _gen(http, "cycle")
    assert v1 == first.json()["version"] == first.headers["X-Prefix-Version"]
    second = upload(http, "cycle", peft_adapter(seed=11))
    assert second.status_code == 200 and second.json()["version"] != v1
    v2, out2 = _gen(http, "cycle")
    assert v2 == second.json()["version"] and out2 != out1
    assert http.delete("/prefixes/cycle").json() == {"task": "cycle", "deleted": v2}
    gone = http.post("/generate?task=cycle", json=GEN)
    assert gone.status_code == 404 and gone.json()["error_type"] == "not_found"
    assert http.get("/prefixes/cycle").status_code == 404
    assert http.delete("/prefixes/cycle").status_code == 404


def _cold_loads(http) -> float:
    """Prefixes put on the device so far (from host memory or the store), from /metrics."""
    lines = http.get("/metrics").text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("prefixserve_prefix_cold_load_seconds_count"))


def test_deleting_a_name_keeps_the_version_another_name_serves_on_the_device(http):
    files = peft_adapter(seed=30)
    version = upload(http, "twin-a", files).json()["version"]
    assert upload(http, "twin-b", files).json()["version"] == version  # one version, two names
    assert _gen(http, "twin-a")[0] == _gen(http, "twin-b")[0] == version  # on the device, both names mapped
    loads = _cold_loads(http)
    assert http.delete("/prefixes/twin-a").json() == {"task": "twin-a", "deleted": version}
    assert _gen(http, "twin-b")[0] == version
    assert _cold_loads(http) == loads  # twin-b's version stayed on the device: no load from host memory or store
    assert http.post("/generate?task=twin-a", json=GEN).status_code == 404


def test_list_get_download_round_trip(http):
    put = upload(http, "roundtrip", peft_adapter(seed=12, tokens=3)).json()
    listed = {p["task"]: p for p in http.get("/prefixes").json()["prefixes"]}
    assert listed["roundtrip"] == put == http.get("/prefixes/roundtrip").json()
    assert any(m["id"] == "roundtrip" for m in http.get("/v1/models").json()["data"])
    z = http.get("/prefixes/roundtrip/download")
    assert z.status_code == 200 and z.headers["X-Prefix-Version"] == put["version"]
    files = {n: zipfile.ZipFile(io.BytesIO(z.content)).read(n) for n in ("manifest.json", "prefix.safetensors")}
    assert json.loads(files["manifest.json"])["sha256"] == put["version"]
    assert http.get("/prefixes/roundtrip/download?file=prefix.safetensors").content == files["prefix.safetensors"]
    again = upload(http, "roundtrip-copy", files)
    assert again.status_code == 201 and again.json()["version"] == put["version"]
    assert _gen(http, "roundtrip")[1] == _gen(http, "roundtrip-copy")[1]


def _metric(http, name: str) -> float:
    """The value of an unlabelled metric in /metrics."""
    line = next(ln for ln in http.get("/metrics").text.splitlines() if ln.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


def test_prompt_tuning_upload(http):
    jobs = _metric(http, "prefixserve_engine_jobs_total")
    r = upload(http, "soft-prompt", peft_adapter(tokens=5, seed=13, prompt_tuning=True))
    assert r.status_code == 201, r.text
    assert _metric(http, "prefixserve_engine_jobs_total") == jobs + 1  # the conversion ran as the engine's job
    assert r.json()["manifest"]["source"] == "peft:prompt_tuning" and r.json()["manifest"]["prefix_length"] == 5
    _gen(http, "soft-prompt")


def test_running_request_finishes_on_the_old_version(http):
    upload(http, "swap", peft_adapter(seed=20))
    body = {"inputs": "Once", "parameters": {"max_new_tokens": 120, "details": True}}
    v_old, ref = _gen(http, "swap", body)
    with http.stream("POST", "/generate_stream?task=swap", json=body) as r:
        assert r.headers["X-Prefix-Version"] == v_old
        lines = r.iter_lines()
        ids = []
        for line in lines:
            if line.startswith("data:"):
                ids.append(json.loads(line[5:])["token"]["id"])
                if len(ids) == 1:
                    assert upload(http, "swap", peft_adapter(seed=21)).status_code == 200
    assert ids == ref
    v_new, _ = _gen(http, "swap", body)
    assert v_new != v_old


def test_description_form_field(http):
    files = peft_adapter(seed=30)
    parts = [("files", (n, io.BytesIO(d))) for n, d in files.items()]
    r = http.put("/prefixes/described", files=parts, data={"description": "summarise news"})
    assert r.status_code == 201 and r.json()["manifest"]["description"] == "summarise news"
