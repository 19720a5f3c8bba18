"""The page in a real browser (Debian's headless Chromium through Selenium) against the app served by
uvicorn: the forms submit, the answer shown is the service's, the plot is displayed, and the layout
is two columns on a laptop and one on a tablet. Screenshots of both are kept under tmp_path."""

from __future__ import annotations

import base64
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from dosewise.serve.app import TOKEN_COOKIE
from dosewise.serve.service import Service
from dosewise.serve.store import Store
from tests.serve.conftest import skip_or_fail
from tests.serve.fixtures import STATE
from tests.serve.test_page import page_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LAPTOP = (1280, 800)
TABLET = (768, 1024)
WAIT_S = 30


class BackgroundServer:
    """uvicorn serving `app` on a free loopback port from a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT_S)
        self.socket.close()


@pytest.fixture(scope="module")
def served(loaded_models, tmp_path_factory) -> Iterator[tuple[str, Service]]:
    service = Service(loaded_models)
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('browser') / 'serve.db'}")
    try:
        with BackgroundServer(page_app(service, store)) as server:
            yield server.url, service
    finally:
        store.close()


@pytest.fixture(scope="module")
def browser():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        skip_or_fail(f"the browser test needs Debian's chromium and chromium-driver; missing: {', '.join(missing)}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
        from selenium.webdriver.common.selenium_manager import SeleniumManager
    except ImportError:
        skip_or_fail("the browser test needs selenium (pip install 'dosewise[dev]')")

    def no_downloads(*_args, **_kwargs):
        raise AssertionError("Selenium Manager was asked for a driver or browser: nothing may be downloaded")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="dosewise-chromium-") as profile, pytest.MonkeyPatch.context() as patch:
        patch.setattr(SeleniumManager, "binary_paths", no_downloads)
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
        driver.set_page_load_timeout(WAIT_S)
        try:
            yield driver
        finally:
            driver.quit()


def resize(driver, size: tuple[int, int]) -> None:
    """The viewport (not the window) at `size`, as a laptop's or tablet's browser shows it."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}
    )
    driver.execute_script("window.dispatchEvent(new Event('resize'))")


def screenshot(driver, path: Path, full_page: bool = False) -> Path:
    """A PNG of the viewport, or of the whole page's length."""
    if full_page:
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        width = int(driver.execute_script("return document.documentElement.clientWidth"))
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    else:
        assert driver.save_screenshot(str(path))
    check_png(path)
    return path


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, f"{path}: {len(data)} bytes"
    try:
        from PIL import Image
    except ImportError:
        from matplotlib.image import imread

        pixels = imread(path)
        assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.01, f"{path} is a single colour"
        return
    with Image.open(path) as image:
        extrema = image.convert("RGB").getextrema()
    assert any(low != high for low, high in extrema), f"{path} is a single colour"


def wait_for(driver, element_id: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(expected_conditions.visibility_of_element_located((By.ID, element_id)))


def paste(driver, text: str) -> None:
    """Put `text` into the history box as a paste does (typing it key by key takes seconds)."""
    from selenium.webdriver.common.by import By

    driver.execute_script("arguments[0].value = arguments[1];", driver.find_element(By.ID, "history"), text)


def boxes(driver, *selectors: str) -> list[dict]:
    return [
        driver.execute_script(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect(); return {x: r.x, y: r.y + window.scrollY, w: r.width, h: r.height};",
            s,
        )
        for s in selectors
    ]


def test_the_vancomycin_form_in_chromium(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    url, service = served
    _, expected = service.recommend_vancomycin("iql", STATE)
    action = expected["policy_action"]
    words = "Keep the dose" if abs(action) < 0.1 else ("Raise the dose" if action > 0 else "Lower the dose")

    resize(browser, LAPTOP)
    browser.get(url + "/")
    assert "Authentication is off" in browser.find_element(By.ID, "auth-off").text
    for name, value in STATE.items():
        field = browser.find_element(By.ID, f"f-{name}")
        field.clear()
        field.send_keys(f"{value:g}")
    browser.find_element(By.ID, "recommend").click()
    wait_for(browser, "verdict")

    assert browser.find_element(By.ID, "verdict-words").text == words
    assert browser.find_element(By.ID, "policy-action").text == f"{action:+.2f}"
    shown = float(browser.find_element(By.ID, "verdict").get_attribute("data-policy-action"))
    assert shown == pytest.approx(action, abs=1e-6)
    plot = browser.find_element(By.CSS_SELECTOR, "#result svg.plot")
    assert plot.is_displayed() and plot.size["width"] > 300 and plot.size["height"] > 150
    assert browser.find_element(By.ID, f"f-{'temperature'}").get_attribute("value") == f"{STATE['temperature']:g}"
    assert browser.find_element(By.ID, "audit-id").text.isdigit()

    form, result = boxes(browser, "#input-panel", "#result")
    assert result["x"] >= form["x"] + form["w"] - 1 and abs(result["y"] - form["y"]) < 5, "laptop: form and result side by side"
    screenshot(browser, tmp_path / "vancomycin-laptop.png")
    screenshot(browser, tmp_path / "vancomycin-laptop-full.png", full_page=True)

    resize(browser, TABLET)
    form, result = boxes(browser, "#input-panel", "#result")
    assert result["y"] >= form["y"] + form["h"] - 1 and result["w"] > TABLET[0] * 0.8, "tablet: one column, the result below the form"
    assert browser.find_element(By.CSS_SELECTOR, "#result svg.plot").size["width"] > 600
    screenshot(browser, tmp_path / "vancomycin-tablet.png")
    screenshot(browser, tmp_path / "vancomycin-tablet-full.png", full_page=True)


def test_an_out_of_range_value_in_chromium_is_explained(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = served
    resize(browser, TABLET)
    browser.get(url + "/")
    for name, value in {**STATE, "temperature": 46.0}.items():
        field = browser.find_element(By.ID, f"f-{name}")
        field.clear()
        field.send_keys(f"{value:g}")
    browser.find_element(By.ID, "recommend").click()
    # the browser itself holds the form back (max 45) until the override is ticked
    assert browser.execute_script("return document.getElementById('f-temperature').validity.rangeOverflow")
    browser.find_element(By.ID, "allow-out-of-range").click()
    browser.find_element(By.ID, "recommend").click()
    wait_for(browser, "verdict")
    assert "temperature = 46 is above the maximum 45" in browser.find_element(By.ID, "overrides").text
    screenshot(browser, tmp_path / "vancomycin-override-tablet-full.png", full_page=True)


def test_a_pasted_anesthesia_history_in_chromium(browser, served, history_rows, tmp_path):
    from selenium.webdriver.common.by import By

    url, service = served
    _, expected = service.recommend_anesthesia("planner", history_rows)

    resize(browser, TABLET)
    browser.get(url + "/?model=planner")
    bad = [dict(row) for row in history_rows]
    bad[2]["BIS"] = "high"
    bad_text = pd.DataFrame(bad).to_csv(index=False)
    paste(browser, bad_text)
    browser.find_element(By.ID, "recommend").click()
    error = wait_for(browser, "form-error")
    assert "row 3" in error.text and "high" in error.text
    assert browser.find_element(By.ID, "history").get_attribute("value").strip() == bad_text.strip()  # kept to correct it
    form, message = boxes(browser, "#anesthesia-form", "#form-error")
    assert message["y"] < form["y"], "the error stands next to (above) the form"
    screenshot(browser, tmp_path / "anesthesia-error-tablet.png")

    paste(browser, pd.DataFrame(history_rows).to_csv(index=False))
    browser.find_element(By.ID, "recommend").click()
    wait_for(browser, "rates")

    for drug in ("propofol", "remifentanil"):
        row = browser.find_element(By.ID, f"rate-{drug}")
        assert int(row.get_attribute("data-rate-ml-h")) == expected[f"{drug}_rate_ml_h"]
        assert f"{expected[f'{drug}_rate_ml_h']} mL/h" in row.text
    assert browser.find_element(By.CSS_SELECTOR, "#result svg.plot").is_displayed()
    screenshot(browser, tmp_path / "anesthesia-tablet-full.png", full_page=True)
    resize(browser, LAPTOP)
    screenshot(browser, tmp_path / "anesthesia-laptop-full.png", full_page=True)


def test_signing_in_with_a_token_in_chromium(browser, loaded_models, tmp_path):
    from selenium.webdriver.common.by import By

    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    token = store.create_token("dr.lee")
    try:
        with BackgroundServer(page_app(Service(loaded_models), store)) as server:
            resize(browser, TABLET)
            browser.get(server.url + "/")
            browser.find_element(By.ID, "token").send_keys("dw_wrong")
            browser.find_element(By.CSS_SELECTOR, ".signin-form button").click()
            assert "That token is not valid" in wait_for(browser, "signin-error").text
            screenshot(browser, tmp_path / "signin-tablet.png")
            browser.find_element(By.ID, "token").send_keys(token)
            browser.find_element(By.CSS_SELECTOR, ".signin-form button").click()
            assert wait_for(browser, "token-name").text == "dr.lee"
            cookie = browser.get_cookie(TOKEN_COOKIE)
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert browser.execute_script("return document.cookie") == ""  # out of reach of scripts
            for name, value in STATE.items():
                browser.find_element(By.ID, f"f-{name}").send_keys(f"{value:g}")
            browser.find_element(By.ID, "recommend").click()
            wait_for(browser, "verdict")
            assert store.audit(limit=1)[0].token_name == "dr.lee"
            resize(browser, LAPTOP)
            browser.execute_script("window.scrollTo(0, 0)")
            screenshot(browser, tmp_path / "signed-in-laptop.png")
            browser.find_element(By.CSS_SELECTOR, ".who button").click()
            wait_for(browser, "token")
            assert browser.get_cookie(TOKEN_COOKIE) is None
    finally:
        store.close()
