"""The web console in a real headless Chromium (Debian's chromium, driven by Playwright), against a store
that a real node filled: studies sent with DCMTK's storescu, analysed by the node's worker, results sent
to a storage SCP; one job failed for real (a spooled file removed before its worker ran)."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import free_port, require_peer, require_tool
from node import admin
from node.commands.serve import Node
from node.config import Config, load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.store import JobState, Store

DATA = PhantomOptions(matrix=192, slices=48, slice_spacing_mm=5.0, min_embolus_mm=12.0,
                      embolus_levels=("central",), companions=())
ADMIN, VIEWER = ("alice", "correct-horse-battery"), ("bob", "viewer-password-1")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Console:
    url: str
    cfg: Config
    store: Store
    positive: str  # StudyInstanceUID of the PE-positive study
    negative: str
    failed_job: int


def _wait(store: Store, uid: str, states: tuple[str, ...], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = store.jobs_of(uid)
        if jobs and jobs[-1]["state"] in states:
            return jobs[-1]
        time.sleep(0.3)
    raise AssertionError(f"study {uid}: no job in {states} after {timeout} s: {store.jobs_of(uid)}")


def _send(folder: Path, port: int) -> None:
    subprocess.run([require_tool("storescu"), "-aec", "PETRIAGE", "-aet", "CT1", "+sd", "+r", "127.0.0.1", str(port),
                    str(folder)], check=True, timeout=120, capture_output=True)


def serve_console(cfg: Config, store: Store):
    from node.web.server import start_console

    return start_console(cfg, store, port=free_port())


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[Console]:
    from node.scp import start_scp
    from node.web import users

    root = tmp_path_factory.mktemp("console")
    pacs_port, node_port = free_port(), free_port()
    pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={root / 'pacs'}", "node.host=127.0.0.1",
                                                        f"node.port={pacs_port}", "node.ae_title=PACS"])
    (root / "pacs").mkdir()
    pacs = start_scp(pacs_cfg, Store(f"sqlite:///{root / 'pacs' / 'db.sqlite'}"), fsync=False)
    base = [f"storage.root={root / 'var'}", "node.host=127.0.0.1", f"node.port={node_port}", "study.quiet_seconds=1.5",
            "model.device=cpu", "model.key_images=2", "metrics.port=0",
            f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs_port}}}]"]
    cfg = load_config(None, environ={}, overrides=base)
    studies = {pe: generate_study(seed, pe=pe, options=DATA) for pe, seed in ((True, 950001), (False, 950002))}
    broken = generate_study(950003, pe=False, options=DATA)
    for pe, study in studies.items():
        write_study(study, root / "in" / str(pe))
    write_study(broken, root / "in-broken")
    node = Node(cfg, sweep_seconds=0.3, stop_timeout=30)
    try:
        for pe in (True, False):
            _send(root / "in" / str(pe), node_port)
        for study in studies.values():
            _wait(node.store, study.identity.study_instance_uid, (JobState.DONE,))
    finally:
        node.stop()
    # A job that fails for real: received by a receiver-only node, one spooled file lost, then a worker.
    receiver = Node(load_config(None, environ={}, overrides=[*base, "node.role=receiver"]), sweep_seconds=0.3,
                    stop_timeout=30)
    uid = broken.identity.study_instance_uid
    try:
        _send(root / "in-broken", node_port)
        _wait(receiver.store, uid, (JobState.QUEUED,))
    finally:
        receiver.stop()
    store = Store(f"sqlite:///{root / 'var' / 'petriage.db'}")
    store.study_files(uid)[0].unlink()
    worker = Node(load_config(None, environ={}, overrides=[*base, "node.role=worker"]), sweep_seconds=0.3,
                  stop_timeout=30)
    try:
        failed = _wait(store, uid, (JobState.FAILED,))
    finally:
        worker.stop()
        pacs.shutdown()
    users.add(store, ADMIN[0], "admin", ADMIN[1])
    users.add(store, VIEWER[0], "viewer", VIEWER[1])
    server = serve_console(cfg, store)
    try:
        yield Console(server.url, cfg, store, studies[True].identity.study_instance_uid,
                      studies[False].identity.study_instance_uid, int(failed["id"]))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    require_peer(Path("/usr/bin/chromium").exists(), "chromium (Debian's package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def _login(browser, console: Console, who: tuple[str, str], width: int = 1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(console.url + "/")
    page.fill("input[name=name]", who[0])
    page.fill("input[name=password]", who[1])
    page.click("form.login button[type=submit]")
    page.wait_for_url(console.url + "/")
    return page


def _client(console: Console, who: tuple[str, str]) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=console.url, follow_redirects=False)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"name": who[0], "password": who[1], "csrf": token})
    assert r.status_code == 303, r.text
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/").text).group(1)
    return client, token


def test_an_anonymous_request_for_a_study_page_is_sent_to_the_login(console, browser):
    page = browser.new_page()
    page.goto(f"{console.url}/studies/{console.positive}")
    assert page.url.startswith(f"{console.url}/login")
    assert page.locator("form.login").is_visible()
    assert "PHANTOM" not in page.content()  # no patient data before a login
    page.close()
    assert httpx.get(f"{console.url}/api/studies/{console.positive}").status_code == 401


def test_an_admin_logs_in_and_sees_the_pe_positive_study_at_the_top(console, browser):
    page = _login(browser, console, ADMIN)
    first = page.locator("tbody#worklist-rows tr").first
    assert "PE suspected" in first.inner_text()
    assert first.locator("a").first.get_attribute("href") == f"/studies/{console.positive}"
    rows = {r.locator("a").first.get_attribute("href"): r.inner_text()
            for r in page.locator("tbody#worklist-rows tr").all()}
    # the PE-negative study's row says what the model decided for it (the bundle's verdict, not this test's)
    _, jobs = admin.find(console.store, console.negative)
    decision = json.loads(jobs[-1]["result"])["decision"]
    assert decision in rows[f"/studies/{console.negative}"], rows
    assert any("not analysed: failed" in r for r in rows.values()), rows
    assert "PHANTOM" in first.inner_text()  # the patient's name, to a logged-in user
    page.close()


def test_the_study_page_shows_the_overlays_the_node_sent(console, browser):
    page = _login(browser, console, ADMIN)
    page.click("tbody a:has-text('PE suspected') >> nth=0")
    page.wait_for_load_state("networkidle")
    images = page.locator(".images img")
    assert images.count() == 3  # model.key_images = 2 key images with the attention overlay, and the summary
    widths = page.eval_on_selector_all(".images img", "els => els.map(e => e.naturalWidth)")
    assert all(w > 100 for w in widths), widths
    assert "Probability of pulmonary embolism" in page.content()  # read back from the SR the node sent
    also = page.locator("p.others").inner_text()  # the objects that are not pictures, by their series
    assert "attention SEG" in also and "key objects" in also and "SR" in also, also
    page.close()


def test_the_worklist_updates_without_a_reload(console, browser):
    page = _login(browser, console, VIEWER)
    first = page.locator("tbody#worklist-rows tr").first
    assert console.positive in first.locator("a").first.get_attribute("href")
    page.evaluate("window.notReloaded = true")
    _, jobs = admin.find(console.store, console.negative)
    admin.set_priority(console.store, jobs[-1]["id"], 99999, by="test")  # the CLI moves it to the top
    try:
        deadline = time.monotonic() + 15  # the page polls every 10 s (our CSP forbids Playwright's eval waits)
        while console.negative not in (first.locator("a").first.get_attribute("href") or ""):
            assert time.monotonic() < deadline, "the worklist did not update"
            page.wait_for_timeout(250)
        assert page.evaluate("window.notReloaded") is True  # the rows changed, the page did not reload
    finally:
        admin.set_priority(console.store, jobs[-1]["id"], jobs[-1]["priority"], by="test")
        page.close()


def test_an_admin_retries_a_failed_job_and_sees_it_queued(console, browser):
    page = _login(browser, console, ADMIN)
    page.goto(f"{console.url}/queue?state=failed")
    row = page.locator(f"tr:has(td:text-is('{console.failed_job}'))")
    assert "spooled files are missing" in row.inner_text()
    row.locator("button:has-text('Retry')").click()
    page.wait_for_load_state("networkidle")
    page.goto(f"{console.url}/queue?state=queued")
    assert page.locator(f"tr:has(td:text-is('{console.failed_job}'))").count() == 1
    uid, jobs = admin.find(console.store, str(console.failed_job))
    assert jobs[0]["state"] == JobState.QUEUED
    assert any(e["kind"] == "admin-retry" and "by web:alice" in e["detail"] for e in console.store.events_of(uid))
    audit = page.locator("ol.audit").inner_text()  # the admin sees the audit trail: this retry, the logins
    assert "admin-retry" in audit and "web-login alice (admin) from 127.0.0.1" in audit
    page.close()


def test_a_viewer_sees_no_actions_and_a_forged_action_is_refused(console, browser):
    page = _login(browser, console, VIEWER)
    page.goto(f"{console.url}/queue")
    assert page.locator("button:has-text('Retry')").count() == 0
    page.close()
    client, token = _client(console, VIEWER)
    r = client.post(f"/jobs/{console.failed_job}/cancel", data={"csrf": token})
    assert r.status_code == 403 and "viewer" in r.text


def test_an_action_without_the_csrf_token_is_refused(console):
    client, token = _client(console, ADMIN)
    assert client.post(f"/jobs/{console.failed_job}/priority", data={"priority": "5"}).status_code == 403
    assert client.post(f"/jobs/{console.failed_job}/priority", data={"priority": "5", "csrf": "x" * 43}
                       ).status_code == 403
    assert client.post(f"/api/jobs/{console.failed_job}/cancel").status_code == 403
    other_origin = client.post(f"/jobs/{console.failed_job}/priority", data={"priority": "5", "csrf": token},
                               headers={"Origin": "https://evil.example"})
    assert other_origin.status_code == 403


def test_the_session_cookie_is_httponly_and_samesite_strict(console):
    client = httpx.Client(base_url=console.url)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"name": ADMIN[0], "password": ADMIN[1], "csrf": token}, follow_redirects=False)
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # plain HTTP here


def test_a_session_ends_when_its_user_changes_password_or_is_removed(console):
    from node.web import users

    users.add(console.store, "dora", "viewer", "dora-password-1")
    client, _ = _client(console, ("dora", "dora-password-1"))
    assert client.get("/").status_code == 200
    time.sleep(1.1)  # the session remembers its login to the second
    users.set_password(console.store, "dora", "dora-password-2")
    assert client.get("/").status_code == 303  # logged out: the password changed after this login
    client, _ = _client(console, ("dora", "dora-password-2"))
    assert client.get("/").status_code == 200
    users.remove(console.store, "dora")
    assert client.get("/").status_code == 303


def test_logins_are_throttled_after_the_configured_failures(console):
    cfg = console.cfg.model_copy(update={"web": console.cfg.web.model_copy(update={"login_attempts": 3})})
    server = serve_console(cfg, console.store)
    try:
        client = httpx.Client(base_url=server.url)
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        codes = [client.post("/login", data={"name": ADMIN[0], "password": "wrong-wrong-wrong", "csrf": token}
                             ).status_code for _ in range(3)]
        blocked = client.post("/login", data={"name": ADMIN[0], "password": ADMIN[1], "csrf": token})
        assert codes == [401, 401, 401]
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    finally:
        server.stop()


def test_the_api_lists_the_worklist_in_the_clis_order(console):
    client, _ = _client(console, ADMIN)
    api = client.get("/api/worklist").json()
    assert [r["id"] for r in api] == [r["id"] for r in admin.worklist(console.store)]
    assert api[0]["study_instance_uid"] == console.positive and api[0]["header"]["patient_id"]
    assert client.get("/api/jobs", params={"state": "nonsense"}).status_code == 422


def test_the_node_serves_the_console_beside_its_listener_when_asked(tmp_path):
    port = free_port()
    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={tmp_path / 'var'}", "node.host=127.0.0.1", f"node.port={free_port()}", "node.role=receiver",
        "metrics.port=0", "web.with_node=true", f"web.port={port}"])
    node = Node(cfg, sweep_seconds=0.5, stop_timeout=10)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    finally:
        node.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/login")


def test_a_console_on_a_network_address_needs_tls(tmp_path):
    from node.errors import ConfigError

    with pytest.raises(ConfigError, match="needs web.tls"):
        load_config(None, environ={}, overrides=["web.host=0.0.0.0"])
    ok = load_config(None, environ={}, overrides=["web.host=0.0.0.0", f"web.tls={{cert: {tmp_path}/c.pem, key: "
                                                  f"{tmp_path}/k.pem}}"])
    assert ok.web.tls is not None


def test_over_tls_the_session_cookie_is_secure(console, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=60)
    cfg = load_config(None, environ={}, overrides=[f"storage.root={console.cfg.storage.root}",
                                                   f"web.tls={{cert: {cert}, key: {key}}}"])
    server = serve_console(cfg, console.store)
    try:
        assert server.url.startswith("https://")
        client = httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=str(cert)))
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
        r = client.post("/login", data={"name": ADMIN[0], "password": ADMIN[1], "csrf": token})
        assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    finally:
        server.stop()


def test_a_trusted_proxy_names_the_user_only_from_its_own_address(console):
    def proxied(addresses: str):
        cfg = load_config(None, environ={}, overrides=[
            f"storage.root={console.cfg.storage.root}",
            f"web.trusted_proxy={{header: X-Remote-User, addresses: [{addresses}]}}"])
        return serve_console(cfg, console.store)

    server = proxied("127.0.0.1/32")
    try:
        as_bob = httpx.get(server.url + "/", headers={"X-Remote-User": VIEWER[0]})
        assert as_bob.status_code == 200 and "bob" in as_bob.text and "PHANTOM" in as_bob.text
        stranger = httpx.get(server.url + "/", headers={"X-Remote-User": "nobody-here"})
        assert stranger.status_code == 303  # a name the console does not know: log in
    finally:
        server.stop()
    server = proxied("10.9.8.0/24")  # the proxy is elsewhere: a header from here names no one
    try:
        assert httpx.get(server.url + "/", headers={"X-Remote-User": VIEWER[0]}).status_code == 303
    finally:
        server.stop()


def test_schemathesis_finds_no_api_answer_that_breaks_its_openapi_description(console, tmp_path):
    # Last in this module: the POST operations really retry and cancel jobs of the shared store.
    client, token = _client(console, ADMIN)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    proc = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run", f"{console.url}/api/openapi.json",
                           "--checks", "all", "--max-examples", "25", "--generation-deterministic",
                           "-H", f"Cookie: {cookie}", "-H", f"X-CSRF-Token: {token}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Selected: 6/6" in proc.stdout and "Tested: 6" in proc.stdout
