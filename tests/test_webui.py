"""The chat page of `trit serve` (GET /), served and used in a real headless
browser: Debian's chromium driven by selenium through chromium-driver (no
browser is downloaded; without them the browser test is skipped, and
`TRIT_BROWSER=1 scripts/test.sh` installs them)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import generator
from fastapi.testclient import TestClient

from trit import webui
from trit.server import create_app

API_KEY = "page-test-key"


def test_the_page_is_served_and_loads_nothing_from_elsewhere() -> None:
    app = create_app(generator("tiny-gqa-packed", exact=False), model_name="tiny", api_key="k")
    webui.mount(app)
    with TestClient(app) as client:
        r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    assert "/v1/chat/completions" in html or "v1/chat/completions" in html
    # No CDN, no external script, style, font or image: the page works offline.
    assert not re.search(r"https?://|\bsrc=|<link\b|@import", html), "an external resource"


# The bundled model writes faster than a browser can be watched, so each text
# step is delayed (the HTTP server, streaming and page are the real ones).
SLOW_SERVER = """
import sys, time
import trit.generator
from trit.cli import main

def slow_step(self):
    time.sleep(0.03)
    return original(self)

# Every generation, alone or batched, runs a step per token.
original = trit.generator.Batch.step
trit.generator.Batch.step = slow_step
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, "serve", "-t", "1", "--port", str(port)]
        + ["--api-key", API_KEY, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"trit serve did not start: {proc.communicate()[1]}") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.communicate(timeout=15)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no chromium and chromedriver (Debian: apt install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def _wait(condition: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_in_a_headless_browser(server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def el(element_id: str) -> Any:
        return browser.find_element(By.ID, element_id)

    def replies() -> list[Any]:
        return list(browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant"))

    browser.get(server)
    # --api-key: the page asks for the key, refuses a wrong one, takes the right one.
    _wait(lambda: el("key-form").is_displayed(), "the key form")
    el("key").send_keys("wrong", Keys.ENTER)
    _wait(lambda: "refused" in el("key-note").text, "the refusal")
    el("key").clear()
    el("key").send_keys(API_KEY, Keys.ENTER)
    _wait(lambda: "tiny-fortunes" in el("model").text, "the model name")
    assert not el("key-form").is_displayed()

    # Sampling settings are sent with the request; the reply streams in.
    el("max_tokens").clear()
    el("max_tokens").send_keys("200")
    el("seed").send_keys("1")
    el("input").send_keys("Tell me a story.", Keys.ENTER)
    first = _wait(lambda: [r.text for r in replies() if r.text.strip()], "streamed text")[0]
    _wait(lambda: len(replies()[0].text) > len(first), "more streamed text")
    assert el("stop").is_displayed() and not el("send").is_displayed()

    # Stop ends this reply and keeps the chat.
    el("stop").click()
    _wait(lambda: "(stopped)" in replies()[0].text, "the stopped mark")
    _wait(lambda: el("send").is_displayed(), "the send button")
    stopped_at = replies()[0].text
    time.sleep(0.3)
    assert replies()[0].text == stopped_at  # nothing arrives after the stop

    el("max_tokens").clear()
    el("max_tokens").send_keys("5")
    el("input").send_keys("Hello", Keys.ENTER)
    _wait(lambda: len(replies()) == 2 and el("send").is_displayed(), "the second reply")
    assert replies()[1].text.strip() and "(stopped)" not in replies()[1].text
    assert "error" not in replies()[1].get_attribute("class")

    el("clear").click()
    _wait(lambda: not browser.find_elements(By.CSS_SELECTOR, "#messages .msg"), "a clear chat")
