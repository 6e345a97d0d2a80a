"""The page of prn serve in a real browser: Debian's headless chromium, driven by selenium,
against a live server on 127.0.0.1 that needs a token. Upload, wait for the scores, move the
threshold slider with the keyboard, check the verdicts change; a bad file alone shows the
request's error, a bad file among good ones its own error in its card. With a model whose map
is known (tests/fake_models.py): the defect regions drawn as boxes over the image, a missed
defect painted with the mouse and saved, a false reject saved as good, both found on disk.

Skips when chromium or chromedriver is absent (.ci/run installs them with apt-get).
PRN_SERVE_SCREENSHOT=path also saves the page's screenshot there.
"""

import csv
import io
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="prn serve needs the serve extra: pip install 'prn[serve]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the dev extra)")
import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from prn.serve import build_app  # noqa: E402
from prn.serve.app import create_app  # noqa: E402
from prn.serve.corrections import CorrectionStore  # noqa: E402
from prn.serve.service import InspectionService  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fake_models import brightness_predictor, drawn, named_calibration_model  # noqa: E402

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
def server(calibrated_run, tmp_path_factory):
    yield from live(build_app(calibrated_run, token=TOKEN, corrections=tmp_path_factory.mktemp("corr")))


@pytest.fixture(scope="module")
def corrections_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("corrections") / "store"


@pytest.fixture(scope="module")
def known_server(calibrated_run, corrections_folder):
    """The brightness model (a pixel is defective at half brightness): boxes where drawn."""
    store = CorrectionStore(corrections_folder, {"checkpoint": "fake", "model_kind": "prn", "pixel_threshold": 0.5})
    service = InspectionService(brightness_predictor(calibrated_run), corrections=store)
    yield from live(create_app(service, token=TOKEN))


@pytest.fixture(scope="module")
def uncalibrated_server(calibrated_run, tmp_path_factory):
    from prn.checkpoint import set_calibration
    bare = tmp_path_factory.mktemp("uncalibrated") / "model.pt"
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", bare)
    set_calibration(bare, None)
    yield from live(build_app(bare))


@pytest.fixture(scope="module")
def review_server(calibrated_run, tmp_path_factory):
    """The calibrated run with a review band whose lower edge is under every score: each part that
    passes the threshold goes to review."""
    from prn.checkpoint import load_checkpoint, set_calibration
    model = tmp_path_factory.mktemp("review") / "model.pt"
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", model)
    cal = load_checkpoint(model)["calibration"]
    set_calibration(model, {**cal, "review_threshold": cal["score_min"] - 1.0, "review_fpr": 0.5})
    yield from live(build_app(model))


@pytest.fixture(scope="module")
def named_server(calibrated_run, demo_root, tmp_path_factory):
    """The calibrated run whose calibration names a suspect held-out image and the one whose
    score is the threshold (fake_models.named_calibration_model), behind a token."""
    model, goods = named_calibration_model(calibrated_run, demo_root, tmp_path_factory.mktemp("named"))
    for url in live(build_app(model, token=TOKEN)):
        yield url, goods


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
    card = browser.find_elements(By.CLASS_NAME, "card")[0]
    assert "regions: none without a pixel threshold" in card.text and not card.find_elements(By.CSS_SELECTOR, "rect.box")
    card.find_element(By.CLASS_NAME, "wrong").click()           # not judged: either correction is offered
    assert card.find_element(By.CLASS_NAME, "save-good").is_displayed()
    assert card.find_element(By.CLASS_NAME, "paint-defect").is_displayed()
    card.find_element(By.CLASS_NAME, "cancel").click()
    assert not card.find_elements(By.CLASS_NAME, "panel") and card.find_element(By.CLASS_NAME, "wrong").is_displayed()
    browser.find_element(By.ID, "threshold").send_keys(Keys.HOME)  # the user sets one: now judged
    assert _verdicts(browser) == (["FAIL"] * 2, ["FAIL"] * 2)


def test_the_docs_page_renders_every_endpoint_offline(server, browser):
    browser.get(f"{server}/?token={TOKEN}")
    browser.get(f"{server}/docs")                        # Swagger UI from the package, no CDN
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == 8)
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert paths == {"/health", "/model", "/model/held-out/{index}", "/model/reload", "/predict", "/corrections",
                     "/corrections.zip"}


def test_page_without_the_token_gets_a_401_that_says_how(server, browser):
    browser.delete_all_cookies()
    browser.get(f"{server}/")
    assert "open /?token=TOKEN once" in browser.find_element(By.TAG_NAME, "body").text


# ----------------------------------------------------------------------------- regions, corrections

DEFECTS = [(150, 20, 50, 20), (10, 100, 25, 16)]     # white boxes on a 320 x 128 image: judged FAIL


def _faint_scratch():
    """480 x 200, dark, with a scratch too faint for the model (brightness 0.39 < 0.5): PASS."""
    image = np.full((200, 480, 3), 40, np.uint8)
    image[95:105, 100:380] = 100
    return image


def _screen_box(driver, element):
    return driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return [r.left, r.top, r.width, r.height];", element)


def _drag(driver, element, start, end):
    """Press at ``start``, move to ``end`` in three steps, release (offsets from the centre)."""
    chain = ActionChains(driver).move_to_element_with_offset(element, *start).click_and_hold()
    for k in (1, 2, 3):
        chain.move_to_element_with_offset(element, start[0] + (end[0] - start[0]) * k // 3,
                                          start[1] + (end[1] - start[1]) * k // 3)
    chain.release().perform()


def test_boxes_are_drawn_and_a_painted_missed_defect_is_saved_with_its_mask(known_server, corrections_folder,
                                                                         browser, tmp_path):
    wait = WebDriverWait(browser, 30)
    browser.get(f"{known_server}/?token={TOKEN}")
    wait.until(lambda d: "prn model" in d.find_element(By.ID, "model-info").text)
    wait.until(lambda d: "0 corrections" in d.find_element(By.ID, "corrections-info").text)
    Image.fromarray(drawn((128, 320), DEFECTS)).save(tmp_path / "boxes.png")
    Image.fromarray(_faint_scratch()).save(tmp_path / "faint.png")
    browser.find_element(By.ID, "operator").send_keys("ana\t")
    browser.find_element(By.ID, "files").send_keys(f"{tmp_path / 'boxes.png'}\n{tmp_path / 'faint.png'}")
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 2)
    boxes_card, faint_card = browser.find_elements(By.CLASS_NAME, "card")
    assert boxes_card.get_attribute("data-verdict") == "defective" and faint_card.get_attribute("data-verdict") == "good"

    # the regions, boxed over the image where the defects were drawn, in the image's pixels
    rects = boxes_card.find_elements(By.CSS_SELECTOR, "svg.boxes rect.box")
    assert sorted(tuple(int(r.get_attribute(k)) for k in ("x", "y", "width", "height")) for r in rects) == sorted(DEFECTS)
    assert "2 regions" in boxes_card.text and "0 regions" in faint_card.text
    left, top, width, height = _screen_box(browser, boxes_card.find_element(By.TAG_NAME, "img"))
    scale = min(width / 320, height / 128)                   # object-fit: contain
    x0, y0 = left + (width - 320 * scale) / 2, top + (height - 128 * scale) / 2
    on_screen = {tuple(round(v) for v in _screen_box(browser, r)) for r in rects}
    want = {tuple(round(v) for v in (x0 + x * scale, y0 + y * scale, w * scale, h * scale)) for x, y, w, h in DEFECTS}
    assert all(any(max(abs(a - b) for a, b in zip(got, w)) <= 3 for got in on_screen) for w in want)

    # the faint card was judged good: "wrong?" opens the paint mode; brush a stroke, then a box
    faint_card.find_element(By.CLASS_NAME, "wrong").click()
    canvas = faint_card.find_element(By.CSS_SELECTOR, "canvas.paint")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    time.sleep(0.2)
    _drag(browser, canvas, (-150, 0), (150, 0))
    faint_card.find_element(By.CSS_SELECTOR, "button.tool.box").click()
    _drag(browser, canvas, (-200, -60), (-160, -30))
    left, top, width, height = _screen_box(browser, canvas)
    cx, cy = left + width / 2, top + height / 2

    def pixel(dx, dy):                                      # a screen offset from the centre -> image pixel
        return int((cx + dx - left) * 480 / width), int((cy + dy - top) * 200 / height)

    faint_card.find_element(By.CLASS_NAME, "save-defect").click()
    wait.until(lambda d: faint_card.find_elements(By.CLASS_NAME, "saved"))
    wait.until(lambda d: "1 correction stored" in d.find_element(By.ID, "corrections-info").text)

    (record,) = [json.loads(x) for x in (corrections_folder / "corrections.jsonl").read_text().splitlines()]
    image = np.asarray(Image.open(corrections_folder / record["image"]))
    mask = np.asarray(Image.open(corrections_folder / record["mask"])) > 0
    assert record["image"].startswith("test/missed/faint-") and record["label"] == "defective"
    np.testing.assert_array_equal(image, _faint_scratch())  # the pixels the model scored
    assert mask.shape == (200, 480)
    for t in np.linspace(0, 1, 25):                         # the brushed stroke, end to end
        x, y = pixel(-150 + 300 * t, 0)
        assert mask[y, x], (x, y)
    (bx0, by0), (bx1, by1) = pixel(-198, -58), pixel(-162, -32)
    assert mask[by0:by1 + 1, bx0:bx1 + 1].all()              # the box, filled
    assert mask.mean() < 0.2                                 # and not much else
    assert record["who"]["operator"] == "ana" and record["page"]["verdict"] == "good"
    assert record["model"]["label"] == "good" and record["upload"]["name"] == "faint.png"

    # the boxes card was judged defective: "wrong?", then save it as good
    boxes_card.find_element(By.CLASS_NAME, "wrong").click()
    boxes_card.find_element(By.CLASS_NAME, "save-good").click()
    wait.until(lambda d: boxes_card.find_elements(By.CLASS_NAME, "saved"))
    records = [json.loads(x) for x in (corrections_folder / "corrections.jsonl").read_text().splitlines()]
    assert records[-1]["label"] == "good" and records[-1]["image"].startswith("train/good/boxes-")
    assert (corrections_folder / records[-1]["image"]).is_file()
    assert [r["correction"] for r in _csv(browser)] == [f"good ({records[1]['id']})", f"defective ({records[0]['id']})"]
    link = browser.find_element(By.ID, "corrections-zip")
    assert link.get_attribute("href").endswith("/corrections.zip") and "disabled" not in link.get_attribute("class")

    shot = tmp_path / "corrections.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["PRN_SERVE_SCREENSHOT"]).with_name("serve_corrections_test.png"))


def test_parts_in_the_review_band_show_review_and_the_slider_moves_its_upper_edge(review_server, browser,
                                                                                 demo_root, tmp_path):
    wait = WebDriverWait(browser, 30)
    browser.get(review_server)
    wait.until(lambda d: "review band from" in d.find_element(By.ID, "model-info").text)
    images = sorted((demo_root / "demo" / "test" / "good").iterdir())[:2] + \
        sorted((demo_root / "demo" / "test" / "hole").iterdir())[:1]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 3)
    slider = browser.find_element(By.ID, "threshold")
    slider.send_keys(Keys.END)                           # every part passes, and every one is in the band
    assert _verdicts(browser) == (["REVIEW"] * 3, ["REVIEW"] * 3)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".card.review")) == 3
    assert not browser.find_elements(By.CSS_SELECTOR, ".card.pass")
    assert "3 to review" in browser.find_element(By.CSS_SELECTOR, "#results caption").text
    assert [(r["verdict"], r["review"]) for r in _csv(browser)] == [("good", "1")] * 3  # passed, to review
    slider.send_keys(Keys.HOME)                          # every part fails: none is left to review
    assert _verdicts(browser) == (["FAIL"] * 3, ["FAIL"] * 3)
    assert "0 to review" in browser.find_element(By.CSS_SELECTOR, "#results caption").text
    assert [(r["verdict"], r["review"]) for r in _csv(browser)] == [("defective", "0")] * 3
    browser.find_element(By.ID, "reset").click()        # the server's own decisions: a pass is a review
    cards, _ = _verdicts(browser)
    server = browser.execute_script("return window.prnPage.state.results.map(r => [r.prediction, r.review])")
    assert [("FAIL" if p else "REVIEW") for p, _ in server] == cards
    assert all(review == (0 if p else 1) for p, review in server)
    shot = tmp_path / "review.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["PRN_SERVE_SCREENSHOT"]).with_name("review.png"))


@pytest.fixture(scope="module")
def drift_server(calibrated_run):
    """The calibrated run whose calibration says its good images were twice as bright as any
    upload: after two images (drift_min_images 2) every upload looks half as bright."""
    from prn.deploy.predict import Predictor
    predictor = Predictor(calibrated_run)
    predictor.cfg = predictor.cfg.replace(drift_min_images=2)
    reference = predictor.calibration["appearance"]
    predictor.calibration = {**predictor.calibration,
                             "appearance": {**reference, "brightness": 2 * reference["brightness"]}}
    yield from live(create_app(InspectionService(predictor)))


def test_the_page_warns_when_the_photos_no_longer_look_like_the_calibrations(drift_server, browser, demo_root,
                                                                              tmp_path):
    wait = WebDriverWait(browser, 30)
    browser.get(drift_server)
    wait.until(lambda d: "prn model" in d.find_element(By.ID, "model-info").text)
    banner = browser.find_element(By.ID, "drift")
    assert not banner.is_displayed()                     # nothing scored yet: nothing to say
    images = sorted((demo_root / "demo" / "test" / "good").iterdir())[:3]
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 3)
    wait.until(lambda d: d.find_element(By.ID, "drift").is_displayed())
    text = banner.text
    assert "darker than the" in text and "prn calibrate RUN --good-images" in text
    shot = tmp_path / "drift.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["PRN_SERVE_SCREENSHOT"]).with_name("drift.png"))
    browser.refresh()                                    # the server remembers: shown again on load
    wait.until(lambda d: d.find_element(By.ID, "drift").is_displayed())
    assert "darker than the" in browser.find_element(By.ID, "drift").text


def test_the_calibrations_notes_show_and_a_named_image_is_scored_on_request(named_server, browser, tmp_path):
    url, goods = named_server
    wait = WebDriverWait(browser, 30)
    browser.get(f"{url}/?token={TOKEN}")
    wait.until(lambda d: d.find_element(By.ID, "calibration-notes").is_displayed())
    notes = browser.find_elements(By.CSS_SELECTOR, "#calibration-notes p")
    assert [n.get_attribute("class") for n in notes] == ["warning", "note"]
    assert notes[0].text.startswith("Calibration warning:") and str(goods[0]) in notes[0].text
    assert "--not-good" in notes[0].text and str(goods[1]) in notes[1].text
    # each named image's button under the message that names it (a suspect, the threshold's image)
    buttons = [n.find_elements(By.CSS_SELECTOR, "button.held-out") for n in notes]
    assert [[b.text for b in bs] for bs in buttons] == [[f"Look at {goods[0].name}"], [f"Look at {goods[1].name}"]]
    buttons = [bs[0] for bs in buttons]
    buttons[1].click()                                   # fetched from the server, scored as an upload
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 1)
    card = browser.find_element(By.CLASS_NAME, "card")
    assert goods[1].name in card.text and card.find_elements(By.TAG_NAME, "img")
    assert [r["file"] for r in _csv(browser)] == [goods[1].name]
    shot = tmp_path / "notes.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["PRN_SERVE_SCREENSHOT"]).with_suffix(".notes.png"))


def test_a_model_without_notes_shows_none(server, browser):
    browser.get(f"{server}/?token={TOKEN}")
    WebDriverWait(browser, 30).until(lambda d: "prn model" in d.find_element(By.ID, "model-info").text)
    assert browser.execute_script("return window.prnPage.state.model.calibration_notes") == []
    box = browser.find_element(By.ID, "calibration-notes")
    assert not box.is_displayed() and not box.find_elements(By.TAG_NAME, "p")


@pytest.fixture(scope="module")
def reloading_server(calibrated_run, tmp_path_factory):
    """The calibrated run's checkpoint copied, served by its path, so that a test can change its
    calibration on disk and have the server reload it."""
    model = tmp_path_factory.mktemp("reloading") / "checkpoints" / "model.pt"
    model.parent.mkdir(parents=True)
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", model)
    for url in live(build_app(model)):
        yield url, model


def test_a_page_open_across_a_model_reload_takes_the_new_threshold_and_notes(reloading_server, browser, demo_root):
    from urllib.request import Request, urlopen

    from prn.checkpoint import load_checkpoint, set_calibration
    url, model = reloading_server
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    wait.until(lambda d: "prn model" in d.find_element(By.ID, "model-info").text)
    images = sorted((demo_root / "demo" / "test" / "good").iterdir())[:2]
    browser.find_element(By.ID, "files").send_keys(str(images[0]))
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 1)
    assert not browser.find_element(By.ID, "model-changed").is_displayed()

    cal = load_checkpoint(model)["calibration"]
    low = cal["score_min"] - 1.0                         # every part fails at the new threshold
    set_calibration(model, {**cal, "image_threshold": low, "threshold_image": {
        "index": 0, "score": low, "next_score": None, "path": str(images[1])}})
    with urlopen(Request(f"{url}/model/reload", method="POST")) as r:
        assert json.loads(r.read())["model"]["generation"] == 1

    browser.find_element(By.ID, "files").send_keys(str(images[1]))
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 2)
    notice = browser.find_element(By.ID, "model-changed")
    wait.until(lambda d: notice.is_displayed())
    assert "another model" in notice.text and "the 1 result shown before was scored by the previous one" in notice.text
    assert f"threshold {low:.4g}" in browser.find_element(By.ID, "model-info").text
    assert str(images[1]) in browser.find_element(By.ID, "calibration-notes").text
    # the slider followed the new calibrated threshold: both cards judged at it
    assert _verdicts(browser) == (["FAIL"] * 2, ["FAIL"] * 2)
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        browser.save_screenshot(str(Path(os.environ["PRN_SERVE_SCREENSHOT"]).with_suffix(".reload.png")))

    # a second reload, and no upload after it: the page learns of it from /health when it is shown
    # again (as every 20 s while shown), before the next part is scored
    high = cal["score_max"] + 1.0                        # every part passes at this one
    set_calibration(model, {**cal, "image_threshold": high})
    with urlopen(Request(f"{url}/model/reload", method="POST")) as r:
        assert json.loads(r.read())["model"]["generation"] == 2
    browser.execute_script("document.dispatchEvent(new Event('visibilitychange'))")
    wait.until(lambda d: f"threshold {high:.4g}" in d.find_element(By.ID, "model-info").text)
    assert "the 2 results shown before were scored by the previous one" in notice.text
    assert browser.execute_script("return window.prnPage.state.model.generation") == 2
    assert _verdicts(browser) == (["PASS"] * 2, ["PASS"] * 2)
    browser.find_element(By.ID, "files").send_keys(str(images[0]))  # the same generation: nothing more to say
    wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == 3)
    assert "the 2 results shown before" in notice.text and _verdicts(browser) == (["PASS"] * 3, ["PASS"] * 3)
    if os.environ.get("PRN_SERVE_SCREENSHOT"):
        browser.save_screenshot(str(Path(os.environ["PRN_SERVE_SCREENSHOT"]).with_suffix(".reload2.png")))
