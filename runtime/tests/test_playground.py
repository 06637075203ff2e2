"""The playground page at `/`, end to end in a real headless browser: Debian's chromium driven by selenium.

Type a text or give an image (file picker and drag-and-drop), press Classify, read the label, the bars and each
pack's row; the labels must be the runtime Classifier's. CI installs chromium and chromium-driver (.ci/run); on a
machine without them the tests are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import base64
import os
import shutil

import pytest

import golden
from serving import classifier, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WAIT_SECONDS = 30


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    driver.set_script_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_SECONDS).until(lambda _: condition())


def _open(driver, url: str) -> None:
    driver.get(f"{url}/")
    _wait(driver, lambda: driver.find_element("id", "submit").is_enabled())


def _classify(driver) -> None:
    """Press Classify and wait for this request's answer (the button is disabled while it runs)."""
    driver.execute_script("document.getElementById('result').hidden = true; document.getElementById('error').hidden = true;")
    driver.find_element("id", "submit").click()
    _wait(driver, lambda: driver.find_element("id", "submit").is_enabled()
          and (driver.find_element("id", "result").is_displayed() or driver.find_element("id", "error").is_displayed()))


def _shown(driver) -> dict:
    """What the page shows: the label, the bars (label -> value text, in order) and the pack rows."""
    bars = driver.find_elements("css selector", "#bars .bar")
    rows = driver.find_elements("css selector", "#pack-results tbody tr")
    return {
        "label": driver.find_element("id", "label").text,
        "bars": [(bar.get_attribute("data-label"), bar.find_element("class name", "value").text) for bar in bars],
        "widths": [bar.find_element("class name", "fill").value_of_css_property("width") for bar in bars],
        "packs": {row.get_attribute("data-pack"): row.find_element("class name", "label").text for row in rows},
        "kind": driver.find_element("id", "score-kind").text,
    }


def _expected_packs(record: dict, pack_names: list[str]) -> dict[str, str]:
    """The per-pack rows the page should show: each pack's label ("abstained" when it has none)."""
    by_pack = record.get("packs") or {pack_names[0]: record}
    return {name: "abstained" if result["label"] is None else result["label"] for name, result in by_pack.items()}


def _expected_bars(record: dict) -> list[tuple[str, str]]:
    scores = record["probabilities"]
    return [(label, f"{value:.3f}") for label, value in sorted(scores.items(), key=lambda pair: -pair[1])]


def test_text_playground(browser, tmp_path):
    case = "qwen2"
    texts = ["the square and the triangle dot is here", "blue ice and snow"]
    expected = [result.to_dict() for result in classifier(golden.bundle_dir(case)).classify_batch(texts)]
    with running_server(golden.bundle_dir(case)) as url:
        _open(browser, url)
        assert "savpack-fixtures/qwen2" in browser.find_element("id", "model").text
        assert not browser.find_element("id", "images-field").is_displayed()  # a text bundle takes no images
        for text, record in zip(texts, expected):
            box = browser.find_element("id", "text")
            box.clear()
            box.send_keys(text)
            _classify(browser)
            shown = _shown(browser)
            assert shown["label"] == record["label"]
            assert shown["bars"] == _expected_bars(record)
            assert shown["packs"] == _expected_packs(record, classifier(golden.bundle_dir(case)).pack_names)
            assert "Vote share" in shown["kind"] or "Probability" in shown["kind"]
        widths = [float(width.removesuffix("px")) for width in shown["widths"]]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0  # bars drawn to scale, largest first
        browser.save_screenshot(str(tmp_path / "text.png"))

        browser.find_element("id", "text").clear()
        _classify(browser)
        error = browser.find_element("id", "error")
        assert error.is_displayed() and error.text == "422: item 0: has neither text nor images"
        assert not browser.find_element("id", "result").is_displayed()


def test_image_playground_file_picker_drop_and_packs(browser, tmp_path):
    case = "qwen2_vl"
    items = golden.items(case)
    loaded = classifier(golden.bundle_dir(case))
    expected = [result.to_dict() for result in loaded.classify_batch(items)]
    with running_server(golden.bundle_dir(case)) as url:
        _open(browser, url)
        assert browser.find_element("id", "images-field").is_displayed()

        # The file picker, with one image.
        browser.find_element("id", "text").send_keys(items[0]["text"])
        browser.find_element("id", "file").send_keys(items[0]["images"][0])
        _wait(browser, lambda: len(browser.find_elements("css selector", "#previews figure")) == 1)
        _classify(browser)
        shown = _shown(browser)
        assert shown["label"] == expected[0]["label"]
        assert shown["bars"] == _expected_bars(expected[0])
        assert shown["packs"] == _expected_packs(expected[0], loaded.pack_names)
        browser.save_screenshot(str(tmp_path / "image.png"))

        # Drag and drop: remove the first picture, drop the next item's two pictures onto the zone.
        browser.find_element("css selector", "#previews figure button").click()
        assert not browser.find_elements("css selector", "#previews figure")
        pictures = [base64.b64encode(open(path, "rb").read()).decode("ascii") for path in items[3]["images"]]
        browser.execute_script("""
            const transfer = new DataTransfer();
            arguments[0].forEach((data, number) => {
              const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
              transfer.items.add(new File([bytes], `dropped${number}.png`, {type: "image/png"}));
            });
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """, pictures)
        _wait(browser, lambda: len(browser.find_elements("css selector", "#previews figure")) == 2)
        box = browser.find_element("id", "text")
        box.clear()
        box.send_keys(items[3]["text"])
        _classify(browser)
        shown = _shown(browser)
        assert shown["label"] == expected[3]["label"]
        assert shown["packs"] == _expected_packs(expected[3], loaded.pack_names)

        # Only the second pack: its result on top, alone in the table.
        browser.find_element("css selector", "#packs input[value='colour']").click()
        _classify(browser)
        shown = _shown(browser)
        loo = expected[3]["packs"]["colour-loo"]
        assert shown["label"] == loo["label"] and shown["bars"] == _expected_bars(loo)
        assert shown["packs"] == {"colour-loo": loo["label"]}
