"""The example project in the Dagster UI, driven by a real browser (headless Chromium).

``dagster dev`` serves the example project; Playwright drives Debian's Chromium (a browser
download is not possible here, so it launches ``/usr/bin/chromium``): it finds the asset,
launches a materialization of one partition, waits for the run to succeed, reads a
``flowstone/`` metadata value on the materialization, and saves a screenshot as a test artifact.
"""

import contextlib
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from flowstone_dagster_tests.support.dagster_dev import ROOT, dagster_dev

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ASSET = "order_audit"
DAY = "2025-01-15"


def _dismiss_community_dialog(page: Page) -> None:
    # The UI may ask a first-time user to join its community; skip it whenever it appears.
    skip = page.get_by_role("button", name="Skip")

    def click_skip() -> None:
        skip.click()

    page.add_locator_handler(skip, click_skip)


@pytest.mark.dagster
def test_materialize_a_partition_from_the_ui(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "example_project" / "dagster.yaml").read_text())
    # Kept after the run (CI can collect it): .artifacts/ is ignored by git.
    artifacts = ROOT / ".artifacts" / "ui"
    artifacts.mkdir(parents=True, exist_ok=True)
    environment = {"FLOWSTONE_DEMO_WAREHOUSE": str(home / "warehouse.duckdb")}
    with dagster_dev("example_project", home=home, env=environment) as url:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                _dismiss_community_dialog(page)

                page.goto(f"{url}/assets/{ASSET}", wait_until="networkidle")
                expect(page.get_by_text(ASSET).first).to_be_visible(timeout=60_000)
                # The community dialog comes a little after the page on a slow machine; once the
                # launch dialog covers it, the handler above can no longer click it away.
                community = page.get_by_text("Join the Dagster community")
                with contextlib.suppress(PlaywrightTimeoutError):
                    community.wait_for(state="visible", timeout=10_000)
                    page.get_by_role("button", name="Skip").click()
                    community.wait_for(state="hidden", timeout=10_000)
                page.get_by_role("button", name="Materialize…").click()
                dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
                partitions = dialog.get_by_placeholder("ex: 2025-01-13", exact=False)
                partitions.fill(DAY)
                partitions.press("Enter")
                dialog.get_by_role("button", name="Launch 1 run").click()
                expect(page.get_by_text(re.compile("Launched run"))).to_be_visible(timeout=60_000)

                # Wait for the run's success on the runs page (the daemon launches it).
                page.goto(f"{url}/runs", wait_until="networkidle")
                success = page.get_by_text("Success", exact=True).first
                for _ in range(60):
                    if success.is_visible():
                        break
                    if page.get_by_text("Failure", exact=True).first.is_visible():
                        page.screenshot(path=str(artifacts / "run-failed.png"))
                        pytest.fail(f"the run failed: see {artifacts / 'run-failed.png'}")
                    page.wait_for_timeout(3000)  # polling a page that refreshes itself
                    page.reload(wait_until="networkidle")
                expect(success).to_be_visible()

                # The materialization's metadata, in the asset's event list.
                page.goto(f"{url}/assets/{ASSET}?view=events", wait_until="networkidle")
                row = page.get_by_text("flowstone/db.store/calls").first
                expect(row).to_be_visible(timeout=60_000)
                body = page.inner_text("body")
                after = body[body.index("flowstone/db.store/calls") :]
                value = re.search(r"flowstone/db\.store/calls\s+(\d+)", after)
                assert value is not None, after[:300]
                assert int(value.group(1)) == 1  # one store of the day's audit rows
                assert f"Partition {DAY} materialized" in body
                page.screenshot(path=str(artifacts / "materialized.png"), full_page=True)
            finally:
                browser.close()
    assert (artifacts / "materialized.png").stat().st_size > 10_000
