"""The search page in headless Chromium (Selenium) against a real server on a loopback port.

Uses Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them where
missing, see tools/install-browser). Set ``BAYESRETRIEVAL_SCREENSHOT=FILE`` to keep a
copy of the search-page screenshot (the README's picture comes from here).
"""

import os
import shutil

import httpx
import pytest
from benchmark_scripts import benchmark_module
from servers import http, running_server

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="the test extra lacks selenium: pip install -e '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from bayesretrieval.cli import main  # noqa: E402
from bayesretrieval.encoders import ClipEncoder  # noqa: E402
from bayesretrieval.indexing import BuildConfig, build_index  # noqa: E402
from bayesretrieval.training import ModelSize, get_trained_model, model_name  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed and "
                                       "tools/install-browser could not install them (it needs root and apt-get)")
TOKEN = "browser-test-token-0123456789"
WAIT_S = 60
SHIFTS = ("clean", "blur")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """``(folder, encoder, posterior)``: 48 drawn scenes (``clean/``, ``blur/``), the test model, its posterior."""
    root = tmp_path_factory.mktemp("browser")
    for shift in SHIFTS:
        options = ["--shift", shift] if shift != "clean" else []
        assert main(["make-world", str(root / "world" / shift), "-n", "24", "--seed", "1", *options]) == 0
        (root / "gallery").mkdir(exist_ok=True)
        (root / "world" / shift / "images").rename(root / "gallery" / shift)
    encoder = ClipEncoder.from_pretrained(model_name(ModelSize.TEST), get_trained_model(ModelSize.TEST))
    with benchmark_module("posterior_shift_auroc") as script:
        posterior = script.fit_on_world(encoder, n_fit=512, seed=11, chunk_size=512).posterior_
    return root / "gallery", encoder, posterior


@pytest.fixture(scope="module")
def index(gallery):
    """The 48 scenes in one index."""
    folder, encoder, posterior = gallery
    build_index(folder, folder.parent / "index", encoder, posterior, BuildConfig(batch_size=16, workers=0))
    return folder.parent / "index"


@pytest.fixture(scope="module")
def shard_dirs(gallery):
    """The 48 scenes in two index directories, one per shift."""
    folder, encoder, posterior = gallery
    for shift in SHIFTS:
        build_index(folder / shift, folder.parent / f"index-{shift}", encoder, posterior,
                    BuildConfig(batch_size=16, workers=0))
    return [folder.parent / f"index-{shift}" for shift in SHIFTS]


@pytest.fixture(scope="module")
def server(index):
    with running_server(index) as served:
        yield served
    assert "Traceback" not in served.err


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, condition, message):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d) or None, message)


def cards(driver, kind="result"):
    return driver.find_elements(By.CSS_SELECTOR, f"#grid .{kind}")


def wait_for_grid(driver, count, kind="result"):
    wait_for(driver, lambda d: len(cards(d, kind)) == count, f"{count} {kind} cards")
    wait_for(driver, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                                   for img in d.find_elements(By.CSS_SELECTOR, "#grid img.thumb")),
             "every thumbnail loaded")
    return cards(driver, kind)


def item_ids(elements):
    return [int(card.get_attribute("data-item-id")) for card in elements]


def shard_item_ids(elements):
    return [(int(card.get_attribute("data-shard")), int(card.get_attribute("data-item-id"))) for card in elements]


def test_a_text_search_shows_thumbnails_bars_and_marks(server, browser, tmp_path):
    browser.get(server.base + "/")
    wait_for(browser, lambda d: "48 items" in d.find_element(By.ID, "served").text, "the index line")
    Select(browser.find_element(By.ID, "score")).select_by_value("lcb")
    assert browser.find_element(By.ID, "kappa-control").is_displayed()
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("48")
    browser.find_element(By.ID, "query").send_keys("a red circle\n")
    shown = wait_for_grid(browser, 48)

    _, answer = http(f"{server.base}/api/search", {"queries": "a red circle", "k": 48, "score": "lcb", "kappa": 1.0})
    rows = answer["queries"][0]["results"]
    assert item_ids(shown) == [row["item_id"] for row in rows]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .result .bar .interval")) == 48
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .result .bar .mean")) == 48
    ticks = browser.find_elements(By.CSS_SELECTOR, "#grid .result:first-child .ticks span")
    assert [t.text for t in ticks] == ["0", "0.25", "0.5", "0.75", "1"]
    marked = item_ids(browser.find_elements(By.CSS_SELECTOR, "#grid .result.high-uncertainty"))
    assert marked == [row["item_id"] for row in rows if row["high_uncertainty"]] and len(marked) == 4
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .mark-uncertain")) == 4
    assert "uncertain" in browser.find_element(By.ID, "legend").text
    screenshot = tmp_path / "search-page.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("BAYESRETRIEVAL_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["BAYESRETRIEVAL_SCREENSHOT"])


def test_an_uploaded_image_gets_the_apis_answer(server, index, browser):
    browser.get(server.base + "/")
    wait_for(browser, lambda d: "48 items" in d.find_element(By.ID, "served").text, "the index line")
    source = sorted((index.parent / "gallery" / "blur").rglob("*.png"))[5]
    browser.find_element(By.ID, "image").send_keys(str(source))
    shown = wait_for_grid(browser, 20)
    answer = httpx.post(f"{server.base}/api/search/image", data={"k": "20"},
                        files={"image": (source.name, source.read_bytes(), "image/png")}, timeout=60).json()
    assert item_ids(shown) == [row["item_id"] for row in answer["queries"][0]["results"]]
    assert answer["queries"][0]["query"] == source.name


def test_the_audit_view_lists_the_least_certain_items(server, browser):
    browser.get(server.base + "/")
    wait_for(browser, lambda d: "48 items" in d.find_element(By.ID, "served").text, "the index line")
    browser.find_element(By.ID, "audit").click()
    shown = wait_for_grid(browser, 20, kind="audit-item")
    _, audit = http(f"{server.base}/api/audit?k=20")
    assert item_ids(shown) == [row["item_id"] for row in audit["items"]]
    assert "least certain of 48 items" in browser.find_element(By.ID, "status").text


def test_with_a_token_the_page_asks_for_it_and_fetches_thumbnails_with_it(index, browser):
    with running_server(index, token=TOKEN) as served:
        browser.get(served.base + "/")
        wait_for(browser, lambda d: d.find_element(By.ID, "token-form").is_displayed(), "the token form")
        assert "token" in browser.find_element(By.ID, "status").text
        browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")
        wait_for(browser, lambda d: "48 items" in d.find_element(By.ID, "served").text, "the index line")
        browser.find_element(By.ID, "query").send_keys("a blue square\n")
        wait_for_grid(browser, 20)
    assert '"GET /api/items/' in served.err and "/thumbnail\" 200" in served.err


def test_results_and_the_audit_over_shards_show_each_items_own_thumbnail(shard_dirs, browser):
    with running_server(shard_dirs) as served:
        browser.get(served.base + "/")
        wait_for(browser, lambda d: "48 items" in d.find_element(By.ID, "served").text, "the index line")
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("48")
        browser.find_element(By.ID, "query").send_keys("a red circle\n")
        shown = wait_for_grid(browser, 48)  # a thumbnail fetched without its shard would be refused and not load
        _, answer = http(f"{served.base}/api/search", {"queries": "a red circle", "k": 48})
        assert shard_item_ids(shown) == [(row["shard"], row["item_id"]) for row in answer["queries"][0]["results"]]
        browser.find_element(By.ID, "audit").click()
        shown = wait_for_grid(browser, 48, kind="audit-item")  # the audit shows k of them
        _, audit = http(f"{served.base}/api/audit?k=48")
        assert shard_item_ids(shown) == [(row["shard"], row["item_id"]) for row in audit["items"]]
        assert {row["shard"] for row in audit["items"]} == {0, 1}
    assert "Traceback" not in served.err and "/thumbnail\" 400" not in served.err
