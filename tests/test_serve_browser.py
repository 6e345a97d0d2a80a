"""The page of prn serve in a real browser: Debian's headless chromium, driven by selenium,
against a live server on 127.0.0.1 that needs a token. Upload, wait for the scores, move the
threshold slider with the keyboard, check the verdicts change; a bad file alone shows the
request's error, a bad file among good ones its own error in its card.

Skips when chromium or chromedriver is absent (.ci/run installs them with apt-get).
PRN_SERVE_SCREENSHOT=path also saves the page's screenshot there.
"""

import csv
import io
import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="prn serve needs the serve extra: pip install 'prn[serve]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the dev extra)")
import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from prn.serve import build_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver on PATH "
           "(apt-get install chromium chromium-driver; .ci/run installs them)")
TOKEN = "browser-test-token-0123456789"


def live(app):
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start: no race with other tests
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the live server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def server(calibrated_run):
    yield from live(build_app(calibrated_run, token=TOKEN))


@pytest.fixture(scope="module")
def uncalibrated_server(calibrated_run, tmp_path_factory):
    from prn.checkpoint import set_calibration
    bare = tmp_path_factory.mktemp("uncalibrated") / "model.pt"
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", bare)
    set_calibration(bare, None)
    yield from live(build_app(bare))


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    except WebDriverException as exc:
        pytest.skip(f"chromium did not start: {exc.msg}")
    yield driver
    driver.quit()


def _verdicts(driver):
    cards = [c.find_element(By.CLASS_NAME, "verdict").text for c in driver.find_elements(By.CLASS_NAME, "card")]
    rows = [r.find_element(By.CLASS_NAME, "verdict").text for r in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")]
    return cards, rows


def _csv(driver):
    return list(csv.DictReader(io.StringIO(driver.execute_script("return window.prnCsv()"))))


def test_page_scores_uploads_and_the_slider_rejudges_them(server, browser, demo_root, tmp_path):
    wait = WebDriverWait(browser, 30)
    browser.get(f"{server}/?token={TOKEN}")              # sets the cookie the page's requests carry
    wait.until(lambda d: "prn model" in d.find_element(By.ID, "model-info").text)
    assert "token" not in browser.current_url

    images = sorted((demo_root / "demo" / "test" / "good").iterdir())[:1] + \
        sorted((demo_root / "demo" / "test" / "hole").iterdir())[:2]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 3)
    scores = [float(c.get_attribute("data-score")) for c in browser.find_elements(By.CLASS_NAME, "card")]
    assert len(set(scores)) == 3                         # the model's scores, one per image

    slider = browser.find_element(By.ID, "threshold")
    slider.send_keys(Keys.HOME)                          # the lowest threshold: every image fails
    assert _verdicts(browser) == (["FAIL"] * 3, ["FAIL"] * 3)
    assert [r["verdict"] for r in _csv(browser)] == ["defective"] * 3
    shown = browser.find_element(By.ID, "threshold-value").text
    slider.send_keys(Keys.END)                           # the highest: every image passes
    assert _verdicts(browser) == (["PASS"] * 3, ["PASS"] * 3)
    assert [r["verdict"] for r in _csv(browser)] == ["good"] * 3
    assert browser.find_element(By.ID, "threshold-value").text != shown

    browser.find_element(By.ID, "reset").click()        # the calibrated threshold: the server's labels
    rows = _csv(browser)
    assert [r["verdict"] for r in rows] == [r["server_label"] for r in rows]
    assert [r["file"] for r in rows] == [p.name for p in images]

    bad = tmp_path / "notes.png"
    bad.write_text("not pixels")
    browser.find_element(By.ID, "files").send_keys(str(bad))
    wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    status = browser.find_element(By.ID, "status").text
    assert "notes.png" in status and "not an image" in status
    assert len(browser.find_elements(By.CLASS_NAME, "card")) == 3

    # one bad file among good ones: the good one is scored, the bad one's card says why
    broken = tmp_path / "broken.png"
    broken.write_text("not pixels either")
    browser.find_element(By.ID, "files").send_keys(f"{images[1]}\n{broken}")
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 5)
    unread = browser.find_elements(By.CSS_SELECTOR, ".card.unread")
    assert len(unread) == 1
    text = unread[0].text
    assert "broken.png" in text and "not an image" in text and "NOT READ" in text
    assert not unread[0].find_elements(By.TAG_NAME, "img")
    status = browser.find_element(By.ID, "status")
    assert "1 could not be read" in status.text and "error" in status.get_attribute("class")
    rows = _csv(browser)
    assert [r["file"] for r in rows][-2:] == [images[1].name, "broken.png"]
    assert rows[-1]["verdict"] == "not read" and "not an image" in rows[-1]["error"]
    assert rows[-1]["score"] == "" and rows[-2]["error"] == ""
    assert float(rows[-2]["score"]) == pytest.approx(float(rows[1]["score"]), abs=1e-6)

    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["PRN_SERVE_SCREENSHOT"])


def test_a_model_without_a_threshold_judges_nothing_until_one_is_set(uncalibrated_server, browser, demo_root):
    wait = WebDriverWait(browser, 30)
    browser.get(uncalibrated_server)
    wait.until(lambda d: "no threshold" in d.find_element(By.ID, "model-info").text)
    images = sorted((demo_root / "demo" / "test" / "good").iterdir())[:2]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 2)
    # no PASS without a threshold: a line must not read "not judged" as "good"
    assert _verdicts(browser) == (["NO THRESHOLD"] * 2, ["NO THRESHOLD"] * 2)
    assert [r["verdict"] for r in _csv(browser)] == ["not judged"] * 2
    assert all(r["threshold"] == "" for r in _csv(browser))
    assert "none judged" in browser.find_element(By.CSS_SELECTOR, "#results caption").text
    assert browser.find_element(By.ID, "reset").get_attribute("disabled")
    browser.find_element(By.ID, "threshold").send_keys(Keys.HOME)  # the user sets one: now judged
    assert _verdicts(browser) == (["FAIL"] * 2, ["FAIL"] * 2)


def test_the_docs_page_renders_every_endpoint_offline(server, browser):
    browser.get(f"{server}/?token={TOKEN}")
    browser.get(f"{server}/docs")                        # Swagger UI from the package, no CDN
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == 3)
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert paths == {"/health", "/model", "/predict"}


def test_page_without_the_token_gets_a_401_that_says_how(server, browser):
    browser.delete_all_cookies()
    browser.get(f"{server}/")
    assert "open /?token=TOKEN once" in browser.find_element(By.TAG_NAME, "body").text
