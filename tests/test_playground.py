"""The playground page in a real headless Chromium against a running server: the adapter list, an upload,
and a side-by-side streamed chat whose texts equal the API's own answers."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from support import real_model, require_in_ci, serve

from aligner_core.adapter_format import Adapter, save

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        require_in_ci("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def wait_until(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail("the page did not reach the expected state in time")


def test_playground_upload_and_side_by_side_chat(server, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    spec = real_model().spec
    path = tmp_path / "pirate-ish.safetensors"
    save(Adapter.random(spec, tokens=1, seed=81, gate_scale=0.08), path)

    browser.get(server.base + "/ui")
    wait_until(lambda: spec.identity in browser.find_element(By.ID, "model").text)
    assert "no adapters yet" in browser.find_element(By.ID, "adapters").text

    browser.find_element(By.ID, "upload-name").send_keys("pirate-ish")
    browser.find_element(By.ID, "upload-file").send_keys(str(path))
    browser.find_element(By.CSS_SELECTOR, "#upload button").click()
    wait_until(lambda: "stored pirate-ish v1" in browser.find_element(By.ID, "upload-status").text)
    wait_until(lambda: "pirate-ish" in browser.find_element(By.ID, "adapters").text)
    assert httpx.get(server.base + "/v1/adapters/pirate-ish").json()["params"] == 828

    Select(browser.find_element(By.ID, "adapter")).select_by_value("pirate-ish")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.find_element(By.ID, "send").click()
    wait_until(lambda: browser.find_element(By.ID, "chat-status").text == "done", timeout=120)
    shown_base = browser.find_element(By.ID, "out-base").text
    shown_adapter = browser.find_element(By.ID, "out-adapter").text

    def api(adapter: str | None) -> str:
        body = {
            "model": spec.identity,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        } | ({"adapter": adapter} if adapter else {})
        return httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"][
            "content"
        ]

    assert "Paris" in shown_base
    assert shown_base == api(None).strip() or shown_base == api(None)
    assert shown_adapter in (api("pirate-ish"), api("pirate-ish").strip()) and shown_adapter != shown_base
    browser.save_screenshot(str(tmp_path / "playground.png"))
