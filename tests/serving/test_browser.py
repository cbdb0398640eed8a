"""The browser front end in a real headless browser (Debian's chromium driven by Selenium):
upload an image → a grid of results → mark relevant / not relevant → re-run → new results."""

from __future__ import annotations

import json
import shutil

import pytest
import requests
from _service_fixtures import DROPPED_LABEL, two_versions

from serving.app import ServiceConfig, make_app
from serving.server import ServiceThread
from serving.versions import OpenOptions, VersionFollower

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("the browser test needs Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver; .ci/run installs them)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

K = 12  # the page's default


@pytest.fixture(scope="module")
def server(tmp_path_factory, flowers_features, flowers_index, weights_dir):
    built = two_versions(tmp_path_factory, flowers_features, flowers_index)
    follower = VersionFollower(str(built["index"]), OpenOptions(weights_dir=weights_dir), poll_seconds=0)
    follower.start()
    with ServiceThread(make_app(follower, ServiceConfig(workers=2))) as thread:
        yield thread.url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _cards(driver) -> list[str]:
    return [c.get_attribute("data-image-id") for c in driver.find_elements(By.CSS_SELECTOR, "#results .card")]


def _wait_status(driver, text: str):
    WebDriverWait(driver, 30).until(lambda d: text in d.find_element(By.ID, "status").text)
    return driver.find_element(By.ID, "status").text


def test_upload_results_feedback_and_new_results(server, browser, flowers):
    query = sorted((flowers / "2").glob("*.jpg"))[5]
    browser.get(server)
    WebDriverWait(browser, 20).until(lambda d: "Index version" in d.find_element(By.ID, "index-info").text)
    assert browser.find_element(By.CSS_SELECTOR, "label[for=file]").text  # the file input has a label

    browser.find_element(By.ID, "file").send_keys(str(query))
    status = _wait_status(browser, "Round 1")
    first = _cards(browser)
    assert len(first) == K and f"{K} results" in status
    assert first[0].startswith("2/")  # the photo itself (or its class) comes first
    assert all(not x.startswith(f"{DROPPED_LABEL}/") for x in first)  # LATEST (the subset) answered
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    # screen-reader basics: every thumbnail has alt text, every control is a real button with a name
    for card in cards:
        img = card.find_element(By.TAG_NAME, "img")
        assert img.get_attribute("alt") and card.get_attribute("data-image-id") in img.get_attribute("alt")
        opener = card.find_element(By.CSS_SELECTOR, ".thumb")
        assert opener.tag_name == "button" and opener.get_attribute("aria-label").startswith("Search by result")
    loaded = "return [...document.querySelectorAll('#results img')].slice(0, 4).every(i => i.naturalWidth > 0)"
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(loaded))
    assert browser.find_element(By.ID, "rerun").get_attribute("disabled") is not None

    # mark: the first result not relevant, the last one relevant
    unlike = cards[0].find_element(By.CSS_SELECTOR, ".mark-unlike")
    like = cards[-1].find_element(By.CSS_SELECTOR, ".mark-like")
    unlike.click()
    like.click()
    assert unlike.get_attribute("aria-pressed") == "true" and like.get_attribute("aria-pressed") == "true"
    rerun = browser.find_element(By.ID, "rerun")
    assert rerun.get_attribute("disabled") is None and "2 marked" in rerun.text
    rerun.click()
    status = _wait_status(browser, "Round 2")
    second = _cards(browser)
    assert "1 relevant and 1 not relevant" in status
    assert len(second) == K and second != first
    assert first[0] not in second or second.index(first[0]) > 0
    # the page asked exactly what the API answers for the same upload and marks
    options = {"k": K, "method": "auto", "rerank": True, "qe": 0, "like": [first[-1]], "unlike": [first[0]]}
    api = requests.post(server + "api/search", files={"image": (query.name, query.read_bytes(), "image/jpeg")},
                        data={"options": json.dumps(options)}, timeout=60).json()
    assert [r["image_id"] for r in api["results"]] == second
    # marks stay on the items they were given to, by image id, across rounds
    for card in browser.find_elements(By.CSS_SELECTOR, "#results .card"):
        pressed = card.find_element(By.CSS_SELECTOR, ".mark-like").get_attribute("aria-pressed")
        assert (pressed == "true") == (card.get_attribute("data-image-id") == first[-1])

    # click a result: search by that item
    target = browser.find_elements(By.CSS_SELECTOR, "#results .card")[3]
    target_id = target.get_attribute("data-image-id")
    target.find_element(By.CSS_SELECTOR, ".thumb").click()
    WebDriverWait(browser, 30).until(lambda d: target_id in d.find_element(By.ID, "query-desc").text
                                     and "Round 1" in d.find_element(By.ID, "status").text)
    by_id = _cards(browser)
    assert target_id not in by_id and len(by_id) == K
    assert browser.find_element(By.ID, "rerun").get_attribute("disabled") is not None  # a new query: no marks


def test_keyboard_reaches_the_query_controls_in_order(server, browser):
    browser.get(server)
    WebDriverWait(browser, 20).until(lambda d: "Index version" in d.find_element(By.ID, "index-info").text)
    order = []
    browser.find_element(By.TAG_NAME, "body").click()
    for _ in range(8):
        ActionChains(browser).send_keys(Keys.TAB).perform()  # to the page, not to the focused file input
        active = browser.switch_to.active_element
        order.append(active.get_attribute("id") or active.get_attribute("class"))
    assert order[0] == "skip" and "search" in order, " ".join(map(str, order))
    assert order.index("file") < order.index("k") < order.index("method") < order.index("rerank") < order.index("qe")
