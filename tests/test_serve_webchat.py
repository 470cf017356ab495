"""The web chat at / in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium): load
the page, attach an image, ask, see the streamed answer (equal to model.generate's) and the tile grid the model
saw; a screenshot goes to the test's folder (and to $NVLM_SCREENSHOT_DIR when set).

python -m pytest tests/test_serve_webchat.py -q
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import picture
from serve_util import served

from nvlm.data.chat import render_chat

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
if not (CHROMIUM and DRIVER):
    pytest.skip(
        "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run does)",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,900",
        "--no-first-run",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))


def test_web_chat_streams_an_answer_and_shows_the_tile_grid(build_model, tmp_path):
    model, processor = build_model("H")
    image_path = tmp_path / "chart.png"
    picture(1000, 500, seed=4).save(image_path)
    with served((model, processor)) as (url, _):
        driver = _browser()
        try:
            driver.set_page_load_timeout(30)
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "nvlm")
            driver.find_element(By.ID, "file").send_keys(str(image_path))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == 1)
            box = driver.find_element(By.ID, "max")
            box.clear()
            box.send_keys("12")
            driver.find_element(By.ID, "prompt").send_keys("What is in this chart?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".assistant").get_attribute("data-done") == "1")
            answer = driver.find_element(By.CSS_SELECTOR, ".assistant .answer").get_attribute("textContent")
            tiles = driver.find_element(By.CSS_SELECTOR, ".assistant .tiles").text
            cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, ".assistant .grid .cell")]
            status = driver.find_element(By.ID, "status").text
            driver.save_screenshot(str(tmp_path / "webchat.png"))
            if os.environ.get("NVLM_SCREENSHOT_DIR"):
                driver.save_screenshot(os.path.join(os.environ["NVLM_SCREENSHOT_DIR"], "webchat.png"))
        finally:
            driver.quit()
    prompt = render_chat([{"role": "user", "content": "<image>\nWhat is in this chart?"}])
    from nvlm.vision.image_io import load_image

    assert answer == model.generate(processor, prompt, [load_image(str(image_path))], max_new_tokens=12)
    assert "1000×500 → grid 2×1, 3 tiles incl. thumbnail" in tiles and "NVLM-H" in tiles
    assert cells == ["tile 1", "tile 2"]
    assert "12 completion tokens" in status
    assert (tmp_path / "webchat.png").stat().st_size > 5000
    print(f"web chat: answer {answer!r}; {tiles.splitlines()[0]}; screenshot {tmp_path / 'webchat.png'}")
