"""The pages in a real browser: Playwright driving Debian's /usr/bin/chromium (headless),
against `castlib web` on a free port. Screenshots of each page go to
test-artefacts/web/ (ignored by git; copies of a run are in docs/screenshots/, linked from the README)."""
from __future__ import annotations

import os
import re

import httpx
import pytest

from tests.helpers import tree_digest, local_url
from tests.web.conftest import ARTEFACTS, REF_FILES, TOKEN

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):   # scripts/install-test-deps installs it
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-test-deps (Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def site(two_trees, web_server):
    """(base URL of a server with a token, db_url, ref root, dst root)."""
    db_url, ref, dst = two_trees
    return web_server(db_url, token=TOKEN), db_url, ref, dst


@pytest.fixture
def page(browser, site):
    context = browser.new_context(base_url=site[0], viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # a download ends its request in the page (aborted): not a failure to load
    page.on("requestfailed", lambda r: None if "format=" in r.url
            else errors.append(f"request failed: {r.url}"))
    yield page
    context.close()
    assert errors == []   # no script error, nothing the page could not load (offline)


def shot(page, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


def test_browse_to_a_file(page, site):
    page.goto("/locations")
    shot(page, "locations")
    page.click(f'#locations a:text-is("{local_url(site[2])}")')
    page.click("text=run1/")
    assert page.inner_text("#crumbs").endswith("run1")
    shot(page, "entries")
    page.click("text=a.dat")
    assert page.inner_text("#file-name") == "a.dat"
    assert page.inner_text("#file-size") == str(len(REF_FILES["run1/a.dat"]))
    assert re.fullmatch(r"[0-9a-f]{8}", page.inner_text("#file-adler32"))
    shot(page, "file")


def test_a_diff_chosen_in_the_page_is_kept_in_the_url(page, site):
    base, _, ref, dst = site
    ids = {r["url"]: r["id"] for r in httpx.get(f"{base}/api/v1/locations").json()["locations"]}
    ref_id, dst_id = ids[local_url(ref)], ids[local_url(dst)]
    page.goto("/diff")
    page.select_option("#diff-ref", str(ref_id))
    page.select_option("#diff-dst", str(dst_id))
    page.click("#diff-go")
    page.wait_for_selector("#diff-total")
    assert f"ref={ref_id}" in page.url and f"dst={dst_id}" in page.url
    assert page.inner_text("#diff-total") == "7"
    assert page.inner_text("#diff-counts td[data-kind=missing]") == "5"
    shot(page, "diff")
    page.reload()   # the URL alone brings the same answer back
    assert page.inner_text("#diff-total") == "7"
    with page.expect_download() as download:
        page.click("#diff-csv")
    assert download.value.suggested_filename == f"diff-{ref_id}-{dst_id}.csv"


def test_the_charts_are_drawn_with_the_catalogs_numbers(page, site):
    base = site[0]
    rows = httpx.get(f"{base}/api/v1/locations").json()["locations"]
    page.goto("/locations")
    drawn = page.evaluate("""() => {
        const chart = Chart.getChart(document.getElementById('chart-bytes'));
        return {labels: chart.data.labels, data: chart.data.datasets[0].data,
                width: chart.width};
    }""")
    assert drawn["data"] == [r["bytes"] for r in rows]
    assert drawn["labels"] == [r["url"] for r in rows] and drawn["width"] > 0
    page.goto(f"/plots?location={rows[0]['id']}")
    days = page.evaluate("() => Chart.getChart(document.getElementById('chart-days'))"
                         ".data.datasets[0].data")
    assert sum(days) == rows[0]["files"]
    history = page.evaluate("() => Chart.getChart(document.getElementById('chart-history'))"
                            ".data.datasets.map(d => d.data.map(p => p.y))")
    assert sorted(h[-1] for h in history) == sorted(r["bytes"] for r in rows)
    shot(page, "plots")


def test_a_sync_started_with_the_token_is_watched_to_its_end(page, site, tmp_path):
    _, _, ref, _ = site
    target = tmp_path / "copy"
    page.goto("/login")
    page.fill("input[name=token]", TOKEN)
    page.click("#login-form button")
    page.wait_for_url("**/actions")
    page.fill("#form-sync input[name=ref]", str(ref))
    page.fill("#form-sync input[name=dst]", str(target))
    assert page.is_checked("#form-sync input[name=dry_run]")   # a plan first
    shot(page, "actions")
    page.click("#form-sync button")
    page.wait_for_url(re.compile(r".*/runs/\d+$"))
    page.wait_for_selector("#run-status:text-is('ok')", timeout=120_000)
    assert not target.exists()                                  # only a plan
    assert page.inner_text("#plan td[data-plan=missing]") == "8"  # 5 files, 3 folders
    assert page.locator("tr.plan-item").count() == 8
    shot(page, "run-plan")
    page.click("#sync-for-real button")
    page.wait_for_url(re.compile(r".*/runs/\d+$"))
    shot(page, "run-running")
    page.wait_for_selector("#run-status:text-is('ok')", timeout=120_000)
    assert page.inner_text("td[data-count='sync.copied']") == "5"
    assert tree_digest(target) == tree_digest(ref)
    shot(page, "run")
    page.goto("/runs?command=sync")
    assert page.locator("#runs tr").count() == 3   # the header, the plan and the sync
    shot(page, "runs")


def test_without_the_token_the_page_refuses(page, site, tmp_path):
    _, _, ref, _ = site
    target = tmp_path / "never"
    page.goto("/actions")
    assert page.is_disabled("#form-sync button")
    page.goto("/login")
    page.fill("input[name=token]", "a forged token")
    page.click("#login-form button")
    assert "wrong token" in page.inner_text("#login-message")
    answer = page.request.post("/actions", form={"stage": "sync", "ref": str(ref),
                                                 "dst": str(target)})
    assert answer.status == 401
    answer = page.request.post("/api/v1/runs", data={"stage": "sync", "params": {
        "ref": str(ref), "dst": str(target)}})
    assert answer.status == 401 and "token" in answer.json()["error"]
    assert not target.exists()
    assert httpx.get(page.url.split("/login")[0] + "/api/v1/runs?command=sync").json()["runs"] == []
