"""The web pages in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A person searches the datasets table, sorts it, pages through it, opens a dataset, reads its
locations, and opens its lineage picture and follows a node. Pages are plain HTML, so everything is
done with links and forms.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration.test_catalogue_support import BACKENDS, dataset_name, dataset_record, shared_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# Debian's chromium and chromium-driver come with scripts/install.sh: missing, these tests fail
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=BACKENDS)
def env(tmp_path_factory, pytestconfig, request):
    env = shared_env(tmp_path_factory, pytestconfig, request.param)
    c = env.client("admin")
    if not c.exists("datasets", dataset_name("webalpha")):
        records = [dataset_record(dataset_name(f"webfill{i:03d}"), total_size=1000 * i) for i in range(70)]
        records.append(dataset_record(dataset_name("webalpha"), total_size=10**12))
        records.append(dataset_record(dataset_name("webbeta"), total_size=5))
        c.bulk_create("datasets", records)
        c.add_location("datasets", dataset_name("webalpha"), "ewc", "s3://ewc/datasets/webalpha.zarr")
        c.add_location("datasets", dataset_name("webalpha"), "leonardo", "/leonardo/data/webalpha.zarr")
        c.register_training("web-train", run_id="run-web", datasets=[dataset_name("webalpha")], status="finished",
                            mlflow_url="http://127.0.0.1:5000/#/experiments/1/runs/run-web")
        c.register_checkpoint("web-ck", {"uuid": "web-ck", "run_id": "run-web"})
    return env


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def navigate(browser, element) -> None:
    """Click a link or button and wait for the next page (a click returns before the page changes)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    html = browser.find_element("tag name", "html")
    element.click()
    WebDriverWait(browser, 15).until(expected_conditions.staleness_of(html))


def names_in_table(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [a.text for a in browser.find_elements(By.CSS_SELECTOR, "table#datasets a.dataset-link")]


def test_search_sort_and_page_the_datasets_table(env, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(env.url + "/datasets")
    assert browser.title.startswith("Datasets")
    assert len(names_in_table(browser)) == 50  # first page
    navigate(browser, browser.find_element(By.ID, "next-page"))
    assert "page 2" in browser.find_element(By.ID, "page-info").text
    assert names_in_table(browser)

    box = browser.find_element(By.ID, "search")
    box.clear()
    box.send_keys("webalpha")
    navigate(browser, browser.find_element(By.ID, "search-button"))
    assert names_in_table(browser) == [dataset_name("webalpha")]
    row = browser.find_element(By.CSS_SELECTOR, "table#datasets tbody tr").text
    assert "931.3 GiB" in row and "ewc, leonardo" in row and "o96" in row

    box = browser.find_element(By.ID, "search")
    box.clear()
    box.send_keys("web")
    navigate(browser, browser.find_element(By.ID, "search-button"))
    navigate(browser, browser.find_element(By.CSS_SELECTOR, 'a.sort[data-field="size"]'))  # ascending
    navigate(browser, browser.find_element(By.CSS_SELECTOR, 'a.sort[data-field="size"]'))  # descending
    assert "order=desc" in browser.current_url and "q=web" in browser.current_url
    assert names_in_table(browser)[0] == dataset_name("webalpha")
    navigate(browser, browser.find_element(By.CSS_SELECTOR, 'a.sort[data-field="usage"]'))
    navigate(browser, browser.find_element(By.CSS_SELECTOR, 'a.sort[data-field="usage"]'))
    assert names_in_table(browser)[0] == dataset_name("webalpha")  # the only one a training used
    browser.save_screenshot(str(tmp_path / "datasets.png"))


def test_open_a_dataset_and_read_its_locations(env, browser):
    from selenium.webdriver.common.by import By

    browser.get(env.url + "/datasets?q=webalpha")
    navigate(browser, browser.find_element(By.LINK_TEXT, dataset_name("webalpha")))
    assert browser.find_element(By.TAG_NAME, "h1").text == dataset_name("webalpha")
    browser.find_element(By.LINK_TEXT, "Locations").click()  # an anchor on the same page
    assert browser.current_url.endswith("#locations")
    rows = browser.find_elements(By.CSS_SELECTOR, "#locations-table tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, "td.platform").text for r in rows] == ["ewc", "leonardo"]
    assert "/leonardo/data/webalpha.zarr" in rows[1].text
    for section in ("overview", "recipe", "variables", "statistics", "lineage"):
        assert browser.find_element(By.ID, section).is_displayed()
    assert "2t" in browser.find_element(By.ID, "statistics").text


def test_lineage_picture_links_to_the_training(env, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(env.url + f"/datasets/{dataset_name('webalpha')}")
    navigate(browser, browser.find_element(By.ID, "lineage-link"))
    picture = browser.find_element(By.CSS_SELECTOR, "#lineage-picture svg")
    nodes = {n.get_attribute("data-id") for n in picture.find_elements(By.CSS_SELECTOR, ".node")}
    assert {f"datasets:{dataset_name('webalpha')}", "trainings:web-train", "weights:web-ck"} <= nodes
    assert len(picture.find_elements(By.CSS_SELECTOR, "path.edge")) >= 2
    assert picture.size["width"] > 400
    browser.save_screenshot(str(tmp_path / "lineage.png"))
    navigate(browser, browser.find_element(By.CSS_SELECTOR, 'a.node[data-id="trainings:web-train"] text:last-of-type'))
    assert "web-train" in browser.find_element(By.TAG_NAME, "h1").text
    assert browser.find_element(By.ID, "mlflow-link").get_attribute("href").startswith("http://127.0.0.1:5000/")
    assert "web-ck" in browser.find_element(By.ID, "overview").text
