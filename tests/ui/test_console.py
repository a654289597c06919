"""The operator's console (/ui) and Swagger UI (/docs) in a real browser: Debian's chromium, driven by playwright,
against the real server on the embedded model with the shipped E2E and WebNLG prefixes and auth on.

Screenshots go to $PREFIXSERVE_SCREENSHOTS when set (docs/img was made so), else to the test's tmp directory."""
from __future__ import annotations

import io
import os
import signal
import zipfile
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_tenants import make_key

pytestmark = [pytest.mark.embedded, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
INPUT = "name : The Eagle | Type : coffee shop | food : French | price : moderate | area : riverside"


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[tuple[Server, str, str]]:
    """The embedded model with auth on (an admin key and a tenant key); e2e and webnlg shared by the admin."""
    work = tmp_path_factory.mktemp("console")
    admin, alice = make_key(str(work / "store"), "ops", admin=True), make_key(str(work / "store"), "alice")
    s = start_server("embedded", work, max_batch_size=8, max_seq_len=512, replica_name="replica-a")
    with s.client(headers={"Authorization": f"Bearer {admin}"}) as c:
        for task in ("e2e", "webnlg"):
            files = [("files", (n, (ROOT / "prefixes" / task / n).read_bytes())) for n in ("manifest.json",
                                                                                          "prefix.safetensors")]
            assert c.put(f"/prefixes/shared~{task}", files=files).status_code == 201
    yield s, admin, alice
    assert stop_server(s) in (0, -signal.SIGTERM), s.log.read_text()[-4000:]


def shots() -> Path | None:
    """Where screenshots go (None: not kept)."""
    return Path(os.environ["PREFIXSERVE_SCREENSHOTS"]) if os.environ.get("PREFIXSERVE_SCREENSHOTS") else None


def tab_to(page, element_id: str, limit: int = 60) -> None:
    """Press Tab until `element_id` has the focus: it is reachable from the keyboard."""
    for _ in range(limit):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} is not reachable with Tab")


def greedy(server: Server, key: str, task: str | None, text: str, n: int) -> str:
    """What /generate answers for the same input (the console must show exactly this)."""
    params = {"task": task} if task else {}
    r = httpx.post(f"{server.url}/generate", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"inputs": text, "parameters": {"max_new_tokens": n}})
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def test_console_with_auth_from_the_keyboard(console, browser_page, tmp_path):
    server, admin, alice = console
    page = browser_page
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#status.bad")
    assert "401" in page.inner_text("#status") and "API key" in page.inner_text("#status")

    page.keyboard.press("Tab")
    tab_to(page, "key")
    page.keyboard.type(alice)
    page.keyboard.press("Enter")
    page.wait_for_selector("#tasks tbody tr:has-text('webnlg')")
    rows = page.locator("#tasks tbody tr")
    assert rows.count() == 2
    e2e = page.locator("#tasks tbody tr", has=page.locator("td:first-child", has_text="e2e")).inner_text()
    cells = e2e.split("\t")
    assert cells[0] == "e2e" and len(cells[1]) == 12 and cells[2].startswith("trainer") and cells[3] == "10", cells
    assert "KiB" in cells[4] and "E2E meaning representation" in cells[6], cells  # size, input format
    assert page.evaluate("sessionStorage.getItem('prefixserve.key')") == alice
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []

    # the playground, keyboard only: bare model, e2e and webnlg side by side, Ctrl+Enter
    for target in ("target-0", "target-1", "target-2"):
        tab_to(page, target)
        assert page.is_checked(f"#{target}")  # the first three are chosen by default
    tab_to(page, "max-tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("24")
    tab_to(page, "prompt")
    page.keyboard.press("Control+A")
    page.keyboard.type(INPUT)
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelectorAll('.output').length === 3 && "
                           "[...document.querySelectorAll('.output .info')].every(i => /length|eos|stop/.test(i.textContent))",
                           timeout=120_000)
    shown = {c.get_attribute("data-target"): c.locator(".text").text_content() for c in page.locator(".output").all()}
    for target in ("", "e2e", "webnlg"):
        assert shown[target] == greedy(server, alice, target or None, INPUT + "\n", 24), (target, shown)
    assert shown["e2e"] != shown[""]  # the prefix changes the output: the point of the side-by-side view
    if shots():
        page.screenshot(path=str(shots() / "console-playground.png"), full_page=True)

    # gauges from /metrics: the requests just made were prefix-cache hits or misses; 8 rows at most
    page.wait_for_function("document.getElementById('g-hits').textContent.includes('%')", timeout=20_000)
    assert page.inner_text("#g-rows").endswith("/ 8")

    # replicas: this one holds e2e and webnlg on the device now
    page.click("#refresh")
    page.wait_for_selector("#tasks tbody tr:has-text('replica-a (device)')")
    assert page.locator("#tasks tbody tr", has_text="replica-a (device)").count() == 2


def test_upload_shows_the_servers_refusal_then_stores(console, browser_page, tmp_path):
    server, admin, _ = console
    page = browser_page
    page.goto(f"{server.url}/ui/")
    page.fill("#key", admin)
    page.press("#key", "Enter")
    page.wait_for_selector("#tasks tbody tr:has-text('e2e')")
    page.fill("#up-name", "mine")
    bad = tmp_path / "adapter_model.bin"
    bad.write_bytes(b"\x80\x04pickle")
    page.set_input_files("#up-files", str(bad))
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#up-result.bad")
    assert "422 validation: files: expected a PEFT adapter" in page.inner_text("#up-result")

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin}"}) as c:
        art = zipfile.ZipFile(io.BytesIO(c.get("/prefixes/e2e/download").content))
        files = {n: art.read(n) for n in art.namelist()}
    page.evaluate("""(files) => {
        const dt = new DataTransfer();
        for (const [name, bytes] of Object.entries(files)) dt.items.add(new File([new Uint8Array(bytes)], name));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", {n: list(b) for n, b in files.items()})
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#up-result:has-text('stored mine')")
    page.wait_for_selector("#tasks tbody tr:has-text('mine')")
    if shots():
        page.screenshot(path=str(shots() / "console-tasks.png"), full_page=True)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin}"}) as c:
        assert c.get("/prefixes/mine").json()["version"] == c.get("/prefixes/e2e").json()["version"]
        assert c.delete("/prefixes/mine").status_code == 200


def test_docs_render_offline(console, browser_page):
    """Swagger UI at /docs loads only from the server itself and renders every route (the browser resolves no
    other host)."""
    server, _, _ = console
    page = browser_page
    hosts: set[str] = set()
    page.on("request", lambda r: hosts.add(httpx.URL(r.url).host))
    page.goto(f"{server.url}/docs")
    page.wait_for_selector(".opblock", timeout=60_000)
    assert page.locator(".opblock").count() >= 20
    assert hosts == {"127.0.0.1"}, hosts
