"""The dashboard in a real headless browser: Debian's chromium driven by selenium through chromedriver.

``make test`` installs both (scripts/browser.sh). The test saves a screenshot of
the page; with ``KSERVICE_UPDATE_SCREENSHOT=1`` it saves it as
docs/images/dashboard.png, the one the README shows (a plain run writes nothing
into the checkout).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kservice import ServiceCallError, ServiceManager
from kservice.testing import wait_for

from .conftest import Running

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"


@pytest.fixture
def browser() -> Iterator[object]:
    """A headless chromium with a fresh profile; quit (with its processes) after the test."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: run 'make test' (as root it installs them) or bash scripts/browser.sh"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="kservice-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _cell(driver: object, service: str, field: str) -> str | None:
    """The cell's ``data-value``, or None while the row is not on the page.

    Read in one script run: the page replaces its rows on every update, so an element found
    by one WebDriver command can be stale by the next.
    """
    return driver.execute_script(  # type: ignore[attr-defined,no-any-return]
        "const cell = document.querySelector(arguments[0]);"
        " return cell === null ? null : cell.getAttribute('data-value');",
        f'#services tr[data-service="{service}"] td[data-field="{field}"]',
    )


def _wait(predicate, timeout: float = 15.0, what: str = ""):  # type: ignore[no-untyped-def]
    return wait_for(predicate, timeout=timeout, what=what or "the page", interval=0.1)


@pytest.mark.timeout(90)
def test_the_page_lists_the_service_and_its_calls_rise(
    served: tuple[str, Running], dashboard: tuple[str, Running], browser: object, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    name, _ = served
    url, _ = dashboard
    driver = browser
    driver.get(url)  # type: ignore[attr-defined]
    # The service the test started appears, running and healthy, with its pid's transport.
    _wait(
        lambda: _cell(driver, name, "state") == "running" and _cell(driver, name, "health") == "ok",
        what=f"{name} listed as running and healthy",
    )
    assert _cell(driver, name, "transport") == "mmap"
    before = int(_cell(driver, name, "requests_total") or 0)

    with ServiceManager() as manager:
        # Calls in bursts of changing size for a few seconds, so the charts have a shape;
        # one failure for the errors list.
        made = 0
        for burst in range(12):
            for i in range(40 + 30 * (burst % 4)):
                manager.call_service_sync(name, "put", (f"k{i}", burst))
                made += 1
            time.sleep(0.5)  # deliberate: bursts spread over seconds give the rate chart a shape
        with pytest.raises(ServiceCallError):
            manager.call_service_sync(name, "boom", ())
        assert manager.call_service_sync(name, "get", ("k1",)) == 11  # the service still serves
        made += 2

    # The call count on the page rises by what the test made (the page updates itself: no reload).
    _wait(lambda: int(_cell(driver, name, "requests_total") or 0) >= before + made, what="the call count to rise")
    assert int(_cell(driver, name, "errors_total") or 0) >= 1
    assert float(_cell(driver, name, "calls_per_second") or 0) >= 0

    # The failed call is listed with the service's own traceback.
    error = _wait(
        lambda: driver.find_elements(By.CSS_SELECTOR, f'#errors li[data-service="{name}"]'),  # type: ignore[attr-defined]
        what="the error to be listed",
    )[0]
    assert "ValueError" in error.text and "the boom method always fails" in error.text
    traceback = error.find_element(By.CSS_SELECTOR, "pre.traceback").get_attribute("textContent")
    assert "Traceback (most recent call last)" in traceback and "raise ValueError" in traceback
    # A traceback the reader opens stays open across the page's updates.
    error.find_element(By.TAG_NAME, "summary").click()
    version = int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-version"))  # type: ignore[attr-defined]
    _wait(
        lambda: int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-version")) >= version + 2,  # type: ignore[attr-defined]
        what="two more updates",
    )
    assert (
        driver.find_element(By.CSS_SELECTOR, f'#errors li[data-service="{name}"] details').get_attribute("open")
        is not None
    )  # type: ignore[attr-defined]

    # A chart per service, with a line drawn from the history; the plugin list.
    # (Each read is one script run: the page rebuilds charts and the plugin table on every update.)
    lines = driver.execute_script(  # type: ignore[attr-defined]
        "return document.querySelectorAll(arguments[0]).length;",
        f'#charts [data-service="{name}"] svg.rate-chart polyline.rate',
    )
    assert lines >= 1
    plugins = driver.execute_script(  # type: ignore[attr-defined]
        "return [...document.querySelectorAll('#plugins tbody tr')].map((row) => row.dataset.plugin);"
    )
    assert {"mmap", "metrics"} <= set(plugins)
    assert driver.find_element(By.ID, "connection").text == "live"  # type: ignore[attr-defined]

    screenshot = SCREENSHOT if os.environ.get("KSERVICE_UPDATE_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
    assert driver.save_screenshot(str(screenshot))  # type: ignore[attr-defined]
    assert screenshot.read_bytes().startswith(b"\x89PNG")
