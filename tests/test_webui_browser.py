"""A real browser (Debian's headless Chromium, driven by Selenium) logs in, generates, sees the image."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from webui_support import PASSWORD, USER, shared_server, start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# CI (.ci/run) installs the browser and sets NBKIT_REQUIRE_BROWSER: there a missing browser fails.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()) and os.environ.get("NBKIT_REQUIRE_BROWSER") != "1",
    reason="Debian's chromium and chromium-driver are not installed (/usr/bin/chromium, /usr/bin/chromedriver); "
    "CI installs them with apt-get",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    return shared_server(tmp_path_factory.mktemp("webui-root"), tiny_model_dir("sd1"))


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1300",
    ):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception:
            result = None
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _log_in(browser, url: str):
    from selenium.webdriver.common.by import By

    browser.get(url)
    # gradio's login form: nothing of the UI is there before logging in.
    username = _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "input[type='text'], input[name='username']"),
        60,
        "the login form",
    )
    assert not browser.find_elements(By.CSS_SELECTOR, "#txt2img-generate")
    username.send_keys(USER)
    browser.find_element(By.CSS_SELECTOR, "input[type='password']").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type='submit'], button.lg").click()
    return _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#txt2img-prompt textarea"), 60, "the txt2img tab"
    )


def _generate(browser, prompt_text: str) -> str:
    """Set 64x64 and 3 steps, type the prompt, click Generate; return the infotext under the image."""
    from selenium.webdriver.common.by import By

    prompt = browser.find_element(By.CSS_SELECTOR, "#txt2img-prompt textarea")
    for elem_id, value in (("txt2img-width", "64"), ("txt2img-height", "64")):
        number = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type='number']")
        number.clear()
        number.send_keys(value)
    steps = browser.find_element(
        By.XPATH,
        "//label[contains(., 'Sampling steps')]/ancestor::div[contains(@class,'block')][1]//input[@type='number']",
    )
    steps.clear()
    steps.send_keys("3")
    prompt.send_keys(prompt_text)
    browser.find_element(By.CSS_SELECTOR, "#txt2img-generate").click()
    _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#txt2img-gallery img"), 120, "an image in the gallery"
    )
    return _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#txt2img-info textarea").get_attribute("value"),
        30,
        "the infotext under the gallery",
    )


def test_login_prompt_generate_and_see_the_image(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _log_in(browser, server.url)
    info = _generate(browser, "a photo of sks dog")
    image = browser.find_element(By.CSS_SELECTOR, "#txt2img-gallery img")
    assert info.startswith("a photo of sks dog\n")
    assert "Steps: 3" in info and "Size: 64x64" in info
    assert "/gradio_api/file=" in image.get_attribute("src")
    screenshot = Path(os.environ.get("NBKIT_SCREENSHOT_DIR", tmp_path)) / "webui-txt2img.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000


def test_a_flux_model_opens_on_a_flow_sampler_and_generates(browser, tmp_path, tiny_model_dir):
    from selenium.webdriver.common.by import By

    server = start_server(tmp_path / "root", tiny_model_dir("flux"), "--auth", f"{USER}:{PASSWORD}")
    try:
        _log_in(browser, server.url)
        sampler = browser.find_element(By.CSS_SELECTOR, "#txt2img-sampler input")
        # A1111's default, "Euler a", is not a flow sampler: the page moves to "Euler" for FLUX.1.
        _wait(lambda: sampler.get_attribute("value") == "Euler", 60, "the sampler to become Euler")
        # CFG moves to 1 (no true CFG pass), and the schedule types are FLUX.1's (no "SGM Uniform").
        cfg = browser.find_element(By.CSS_SELECTOR, "#txt2img-cfg input[type='number']")
        _wait(lambda: cfg.get_attribute("value") == "1", 30, "CFG Scale to become 1")
        browser.find_element(By.CSS_SELECTOR, "#txt2img-scheduler input").click()
        offered = _wait(
            # An item's text is its label, under a check mark when it is the one chosen.
            lambda: [
                item.text.split("\n")[-1]
                for item in browser.find_elements(By.CSS_SELECTOR, "#txt2img-scheduler li")
            ],
            30,
            "the schedule types",
        )
        browser.find_element(By.CSS_SELECTOR, "#txt2img-prompt textarea").click()  # closes the list
        info = _generate(browser, "a photo of zwx dog")
    finally:
        server.stop()
    assert info.startswith("a photo of zwx dog\n")
    assert "Sampler: Euler," in info and "Distilled CFG Scale: 3.5" in info and "Size: 64x64" in info
    assert "SGM Uniform" not in offered
    assert set(offered) == {"Automatic", "Simple", "Karras", "Exponential", "Beta"}, offered
    assert "CFG scale: 1," in info


def test_extras_tab_upscales_a_picture_with_a_model(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    from nbkit.generation.upscalers import save_tiny_esrgan

    save_tiny_esrgan(server.root / "upscalers", scale=2)  # listed when the page opens
    picture = tmp_path / "source.png"
    Image.new("RGB", (48, 32), "teal").save(picture)
    _log_in(browser, server.url)
    _wait(
        lambda: [
            tab
            for tab in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']")
            if tab.text == "Extras"
        ],
        30,
        "the Extras tab",
    )[0].click()
    upload = _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#extras-image input[type='file']"),
        30,
        "the source box",
    )
    upload.send_keys(str(picture))
    menu = browser.find_element(By.CSS_SELECTOR, "#extras-upscaler-1 input")
    _wait(lambda: menu.click() or True, 30, "the upscaler menu to open (not under the upload's spinner)")
    _wait(
        lambda: [
            item
            for item in browser.find_elements(By.CSS_SELECTOR, "#extras-upscaler-1 li")
            if item.text.split("\n")[-1] == "tiny-esrgan-2x"
        ],
        30,
        "the tiny ESRGAN in the upscaler menu",
    )[0].click()
    browser.find_element(By.CSS_SELECTOR, "#extras-generate").click()
    info = _wait(
        lambda: (
            "Postprocess" in (text := browser.find_element(By.CSS_SELECTOR, "#extras-info").text) and text
        ),
        120,
        "the result's info",
    )
    assert "Postprocess upscale by: 2, Postprocess upscaler: tiny-esrgan-2x" in info
    assert browser.find_element(By.CSS_SELECTOR, "#extras-result img").get_attribute("src")
    browser.save_screenshot(str(Path(os.environ.get("NBKIT_SCREENSHOT_DIR", tmp_path)) / "webui-extras.png"))
