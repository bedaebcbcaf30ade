"""The page in headless Chromium: search by text and by image, an image's view, review, job, XSS, the token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from loupe.jobs.search import search
from loupe.jobs.serve.app import build_app
from loupe.jobs.serve.guard import check_bind
from loupe.jobs.status import job_status
from loupe.schemas.errors import UserError
from tests.jobs.serve.conftest import XSS_CAPTION, live_server, require_browser

TOKEN = "browser-token-1234"


@pytest.fixture(scope="module")
def rows(catalog_output):
    out = Path(catalog_output)
    manifest = json.loads((out / "_manifest.json").read_text())
    return [r for p in manifest["parts"] for r in pq.read_table(out / p["path"]).to_pylist()]


def wait(browser, condition, timeout=60):
    return WebDriverWait(browser, timeout).until(lambda d: condition(d) or False)


def tiles(browser, where="#results"):
    return browser.find_elements(By.CSS_SELECTOR, f"{where} .tile")


def ids(elements):
    return [e.get_attribute("data-id") for e in elements]


def assert_nothing_ran(browser):
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 - an alert() from the caption would be open here
    assert browser.execute_script("return document.scripts.length") == 1  # app.js alone
    assert not browser.find_elements(By.CSS_SELECTOR, 'img[src="x"], #view script')
    # Not even blocked attempts: the policy would log a refusal for any inline script or handler.
    assert not [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def test_search_by_text_then_filter(browser, site, catalog_output, rows):
    browser.get(site)
    box = wait(browser, lambda d: d.find_elements(By.ID, "q"))[0]
    box.send_keys("a red square", Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "count").text == "12 shown")
    expected = search(catalog_output, text="a red square", k=12)
    assert ids(tiles(browser)) == [hit.image_id for hit in expected]
    first = tiles(browser)[0]
    assert first.find_element(By.CSS_SELECTOR, ".score").text == f"{expected[0].score:.3f}"
    assert first.find_element(By.CSS_SELECTOR, ".caption").text == (expected[0].caption or "").split("\n")[0]
    # The hostile caption's first line is shown as the text it is.
    hostile = next(t for t in tiles(browser) if t.get_attribute("data-id") == _xss_id(rows))
    assert hostile.find_element(By.CSS_SELECTOR, ".caption").get_property("textContent") == XSS_CAPTION.split("\n")[0]

    browser.find_element(By.ID, "exclude-flagged").click()
    unflagged = [hit.image_id for hit in search(catalog_output, text="a red square", k=24, exclude_flagged=True)]
    wait(browser, lambda d: ids(tiles(d)) == unflagged)
    assert "exclude_flagged=true" in browser.current_url
    assert_nothing_ran(browser)


def test_search_by_image(browser, site, rows):
    query = next(r for r in rows if r["status"] == "ok" and r["source_uri"].endswith(".png"))
    browser.get(site)
    wait(browser, lambda d: d.find_elements(By.ID, "file"))[0].send_keys(query["source_uri"])
    wait(browser, lambda d: len(tiles(d)) == 12)
    assert ids(tiles(browser))[0] == query["image_id"]
    assert Path(query["source_uri"]).name in browser.find_element(By.ID, "query-note").text


def test_open_an_image(browser, site, rows):
    row = next(r for r in rows if r["status"] == "ok" and r["caption"] != XSS_CAPTION)
    browser.get(f"{site}#/?q=shapes")
    wait(browser, lambda d: any(t.get_attribute("data-id") == row["image_id"] for t in tiles(d)))
    next(t for t in tiles(browser) if t.get_attribute("data-id") == row["image_id"]).click()
    caption = wait(browser, lambda d: d.find_elements(By.ID, "caption"))[0]
    assert caption.get_property("textContent") == row["caption"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#scores .score-row")) == 10
    flagged = {e.get_attribute("data-key") for e in browser.find_elements(By.CSS_SELECTOR, "#scores .score-row.flagged")}
    assert flagged == set(row["flagged_categories"] or [])
    picture = browser.find_element(By.ID, "picture")
    wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture))
    page = browser.find_element(By.ID, "view").text
    assert row["sha256"] in page and row["source_uri"] in page and f"{row['width']} × {row['height']} px" in page
    neighbours = wait(browser, lambda d: tiles(d, "#neighbours"))
    assert len(neighbours) == 11 and row["image_id"] not in ids(neighbours)


def test_the_xss_caption_is_inert(browser, site, rows):
    browser.get(f"{site}#/image/{_xss_id(rows)}")
    caption = wait(browser, lambda d: d.find_elements(By.ID, "caption"))[0]
    assert caption.get_property("textContent") == XSS_CAPTION
    assert "<script>alert(1)</script>" in caption.text
    wait(browser, lambda d: tiles(d, "#neighbours"))
    assert_nothing_ran(browser)


def test_review_blurs_until_clicked_with_keyboard_navigation(browser, site, rows):
    browser.get(f"{site}#/review/violence_gore")
    wait(browser, lambda d: len(tiles(d, "#review")) == 12)
    shown = tiles(browser, "#review")
    scores = [float(t.find_element(By.CSS_SELECTOR, ".score").text) for t in shown]
    assert scores == sorted(scores, reverse=True)
    expected = sorted((r for r in rows if r["moderation"]), key=lambda r: -r["moderation"]["violence_gore"])
    assert ids(shown) == [r["image_id"] for r in expected]

    def blurred(tile):
        image = tile.find_element(By.CSS_SELECTOR, ".thumb")
        return "blur" in browser.execute_script("return getComputedStyle(arguments[0]).filter", image)

    assert all(blurred(t) for t in shown)
    shown[0].click()
    assert not blurred(shown[0]) and shown[0].get_attribute("aria-pressed") == "true"
    assert blurred(shown[1])
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element == shown[1]
    browser.switch_to.active_element.send_keys(Keys.SPACE)
    assert not blurred(shown[1])
    browser.switch_to.active_element.send_keys("k")
    assert browser.switch_to.active_element == shown[0]
    shown[0].click()  # hide it again
    assert blurred(shown[0])
    browser.switch_to.active_element.send_keys("j")
    browser.switch_to.active_element.send_keys(Keys.ENTER)  # revealed: Enter opens it
    wait(browser, lambda d: d.current_url.endswith(f"#/image/{expected[1]['image_id']}"))


def test_job_view(browser, site, catalog_output):
    browser.get(f"{site}#/job")
    state = wait(browser, lambda d: d.find_elements(By.ID, "job-state"))[0]
    assert state.text == "complete"
    stats = browser.find_element(By.ID, "job-stats").text
    assert "3 of 3 done" in stats and "12 ok, 2 error" in stats
    rows_chart = browser.find_element(By.ID, "chart-rows")
    labels = [t.text for t in rows_chart.find_elements(By.TAG_NAME, "text")]
    assert "error: empty_file" in labels and "error: truncated" in labels
    flagged = job_status(catalog_output).flagged
    chart = browser.find_element(By.ID, "chart-flagged")
    assert len(chart.find_elements(By.CSS_SELECTOR, "rect.flag")) == len(flagged) >= 8
    labels = [t.text for t in chart.find_elements(By.TAG_NAME, "text")]
    for category, count in flagged.items():
        assert labels[labels.index(category) + 1] == str(count)
    browser.get(f"{site}docs")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".endpoint")) == 7)


def test_a_token_is_required_beyond_loopback(browser, loaded):
    with pytest.raises(UserError) as refused:
        check_bind("127.0.0.2", None)
    assert "\n" not in str(refused.value) and "--token" in str(refused.value)
    with live_server(build_app(*loaded, token=TOKEN), host="127.0.0.2") as address:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{address}api/status", timeout=30)
        assert denied.value.code == 401
        browser.get(address)
        wait(browser, lambda d: d.current_url.endswith("/login"))
        browser.find_element(By.ID, "token").send_keys("not it", Keys.ENTER)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".login-form .error"))
        browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
        box = wait(browser, lambda d: d.find_elements(By.ID, "q"))[0]
        box.send_keys("a red square", Keys.ENTER)
        wait(browser, lambda d: len(tiles(d)) == 12)
        image = tiles(browser)[0].find_element(By.CSS_SELECTOR, "img")
        wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))


def test_a_missing_browser_skips_but_fails_under_ci(monkeypatch, tmp_path):
    absent = str(tmp_path / "chromium")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        require_browser(absent)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        require_browser(absent)


def _xss_id(rows) -> str:
    return next(r["image_id"] for r in rows if r["caption"] == XSS_CAPTION)
