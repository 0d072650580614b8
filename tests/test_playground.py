"""The playground page in a real headless Chromium against a running server: the adapter list, an upload,
and a side-by-side streamed chat whose texts equal the API's own answers, for one adapter and for a stack of
two at strengths set with the sliders (strength 0 gives the base model's text)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from support import real_model, require_in_ci, serve

from aligner_core.adapter_format import Adapter, encode, save

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def browser():
    yield from start_chromium()


def start_chromium():
    """A headless Chromium WebDriver, quit at the end (a fixture's body: tests/test_fine_tune_clients.py's too)."""
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

    Select(browser.find_element(By.CSS_SELECTOR, "#stack select")).select_by_value("pirate-ish")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.find_element(By.ID, "send").click()
    wait_until(lambda: browser.find_element(By.ID, "chat-status").text == "done", timeout=120)
    shown_base = browser.find_element(By.ID, "out-base").text
    shown_adapter = browser.find_element(By.ID, "out-adapter").text

    assert browser.find_element(By.ID, "adapter-title").text == "adapters: pirate-ish ×1.00"
    assert "Paris" in shown_base
    assert shown_base == api(server, {}).strip() or shown_base == api(server, {})
    plain = api(server, {"adapter": "pirate-ish"})
    assert shown_adapter in (plain, plain.strip()) and shown_adapter != shown_base
    browser.save_screenshot(str(tmp_path / "playground.png"))


def api(server, choice: dict) -> str:
    """The API's own greedy answer to the page's question, with `choice` ({"adapter"} or {"adapters"})."""
    body = {
        "model": real_model().spec.identity,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
    } | choice
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def send_and_read(browser) -> tuple[str, str]:
    """Click Send, wait for both panes, return (base text, adapted text)."""
    from selenium.webdriver.common.by import By

    browser.execute_script("document.getElementById('chat-status').textContent = ''")
    browser.find_element(By.ID, "send").click()
    wait_until(lambda: browser.find_element(By.ID, "chat-status").text == "done", timeout=120)
    return browser.find_element(By.ID, "out-base").text, browser.find_element(By.ID, "out-adapter").text


def test_playground_stack_with_strength_sliders(server, browser, tmp_path) -> None:
    """Two adapters stacked, one slider driven down to 0.5 with the keyboard: the adapted pane shows the API's
    answer to the same `adapters` body. Then one adapter with its slider at 0: the base model's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    spec = real_model().spec
    for name, seed in (("stack-a", 82), ("stack-b", 83)):
        data = encode(Adapter.random(spec, tokens=1, seed=seed, gate_scale=0.08))
        up = httpx.post(server.base + "/v1/adapters", data={"name": name}, files={"file": ("a.safetensors", data)})
        assert up.status_code == 201, up.text

    browser.get(server.base + "/ui")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#stack .stack-row"))  # one row to start with
    browser.find_element(By.ID, "add-adapter").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#stack .stack-row")
    assert len(rows) == 2
    Select(rows[0].find_element(By.TAG_NAME, "select")).select_by_value("stack-a")
    Select(rows[1].find_element(By.TAG_NAME, "select")).select_by_value("stack-b")
    slider, shown = (
        rows[0].find_element(By.CSS_SELECTOR, "input[type=range]"),
        rows[0].find_element(By.TAG_NAME, "output"),
    )
    assert (slider.get_attribute("min"), slider.get_attribute("max"), shown.text) == ("-1", "2", "1.00")
    slider.send_keys(*[Keys.ARROW_LEFT] * 10)  # ten steps of 0.05 down from 1
    assert shown.text == "0.50" and slider.get_attribute("value") == "0.5"
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")

    base, stacked = send_and_read(browser)
    assert browser.find_element(By.ID, "adapter-title").text == "adapters: stack-a ×0.50 + stack-b ×1.00"
    browser.save_screenshot(str(tmp_path / "playground-stack.png"))
    expected = api(server, {"adapters": [{"name": "stack-a", "scale": 0.5}, {"name": "stack-b", "scale": 1}]})
    assert stacked in (expected, expected.strip()) and stacked != base
    assert base in (api(server, {}), api(server, {}).strip())

    rows[1].find_element(By.TAG_NAME, "button").click()  # remove stack-b
    assert len(browser.find_elements(By.CSS_SELECTOR, "#stack .stack-row")) == 1
    browser.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert shown.text == "0.00"
    base_again, at_zero = send_and_read(browser)
    assert browser.find_element(By.ID, "adapter-title").text == "adapters: stack-a ×0.00"
    assert at_zero == base_again == base
    zero = api(server, {"adapters": [{"name": "stack-a", "scale": 0}]})
    assert at_zero in (zero, zero.strip())
