"""The web page at ``/`` in a real headless browser (Chromium through Selenium): chat twice, watch the memory panel.

Needs ``chromium`` and ``chromedriver`` on the PATH (Debian: ``apt-get install chromium chromium-driver``) and the
``selenium`` package (``make browser`` installs all three); skipped with the reason when any is missing. A
screenshot of the page after the second reply is saved in the test's folder and copied to ``bench-out/``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_serve import serving, with_role_template

ARTIFACTS = Path(__file__).resolve().parent.parent / "bench-out" / "serve-page"
WAIT_S = 120


def _browser_missing() -> str:
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return ", ".join(missing)


pytestmark = pytest.mark.skipif(
    bool(_browser_missing()), reason=f"no headless browser ({_browser_missing()} missing; `make browser` installs it)"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    service = webdriver.ChromeService(executable_path=str(shutil.which("chromedriver")))
    driver = webdriver.Chrome(options=options, service=service)  # a given driver: Selenium Manager stays offline
    try:
        yield driver
    finally:
        driver.quit()


def send(driver: Any, text: str, replies: int) -> str:
    """Type ``text``, press Send, wait until the ``replies``-th reply's usage line is in; returns that line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()

    def usage_line(d: Any) -> str | bool:
        metas = [m.text for m in d.find_elements(By.CSS_SELECTOR, "#log .meta")]
        return len(metas) >= replies and "cached" in metas[replies - 1] and metas[replies - 1]

    return str(WebDriverWait(driver, WAIT_S).until(usage_line))


def session_rows(driver: Any) -> list[list[str]]:
    """The sessions table's cells, read in one script call (the panel rewrites the table on every poll)."""
    script = (
        "return [...document.querySelectorAll('#sessions tr')].slice(1).map(r => [...r.cells].map(c => c.textContent))"
    )
    return list(driver.execute_script(script))


def settled(driver: Any, tokens: int) -> list[list[str]]:
    """The session rows once one holds at least ``tokens`` tokens (a poll during a turn shows it filling)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d: Any) -> list[list[str]] | bool:
        rows = session_rows(d)
        return bool(rows) and max(int(r[2]) for r in rows) >= tokens and rows

    return list(WebDriverWait(driver, WAIT_S).until(ready))


def test_chat_through_the_page_updates_the_memory_panel(tiny_model_dir: Path, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    model_dir = with_role_template(tiny_model_dir, tmp_path / "model")
    with serving(model_dir, tmp_path / "sessions", "--max-tokens", "8") as served:
        browser.get(served.url + "/")
        assert browser.title == "tiermem serve"
        first = send(browser, "The pass key is 4321. Remember it.", 1)
        match = re.match(r"prompt (\d+) tokens \((\d+) cached\), reply (\d+); first token \d+ ms, turn \d+ ms", first)
        assert match is not None, first
        assert int(match[2]) == 0 and int(match[3]) >= 1
        replies = browser.find_elements(By.CSS_SELECTOR, "#log .assistant")
        assert replies[0].text.startswith("model:")

        (row,) = settled(browser, int(match[1]))  # the panel polls every 2 s
        assert row[1] == "full" and row[3] == "ram"

        second = send(browser, "What is the pass key?", 2)
        again = re.match(r"prompt (\d+) tokens \((\d+) cached\)", second)
        assert again is not None and int(again[2]) >= int(match[1])  # the first turn was not read again
        grown = settled(browser, int(again[1]))
        assert len(grown) == 1  # the second turn continued the same session
        assert "RAM: 1 sessions" in browser.find_element(By.ID, "tiers").text

        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
