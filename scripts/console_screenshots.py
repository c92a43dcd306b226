"""Screenshots of the web console at desktop and phone widths, for docs/ (look at every one of them).

    .venv/bin/python scripts/console_screenshots.py --url http://127.0.0.1:8080 --user demo --password ...

Logs in with Debian's Chromium (Playwright, executable_path), then writes ``console-worklist-{desktop,phone}.png``,
``console-study-{desktop,phone}.png`` (the most suspicious study) and ``console-queue-desktop.png`` under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    a.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=ARGS)
        for width, tag in ((1280, "desktop"), (390, "phone")):
            page = browser.new_page(viewport={"width": width, "height": 800}, device_scale_factor=1)
            page.goto(a.url + "/")
            page.fill("input[name=name]", a.user)
            page.fill("input[name=password]", a.password)
            page.click("form.login button[type=submit]")
            page.wait_for_url(a.url + "/")
            page.screenshot(path=str(a.out / f"console-worklist-{tag}.png"), full_page=True)
            page.click("tbody#worklist-rows a >> nth=0")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(a.out / f"console-study-{tag}.png"), full_page=tag == "desktop")
            if tag == "desktop":
                page.goto(a.url + "/queue")
                page.screenshot(path=str(a.out / "console-queue-desktop.png"), full_page=True)
            page.close()
        browser.close()
    print(f"wrote the console's screenshots under {a.out}")


if __name__ == "__main__":
    main()
