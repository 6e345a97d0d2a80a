"""prn serve through FastAPI's test client: decisions equal prn predict's, pictures, every bad
input answered with a 4xx JSON error naming the problem (or, for one bad image among good ones,
an error entry in its place), the token, and the one model's lock.

The model is the session's tiny calibrated run (conftest.calibrated_run); the images are
random, of other sizes than the model's 64 x 64.
"""

import base64
import csv
import io
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="prn serve needs the serve extra: pip install 'prn[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from prn import api  # noqa: E402
from prn.checkpoint import set_calibration  # noqa: E402
from prn.cli import main  # noqa: E402
from prn.data.io import read_image_bytes  # noqa: E402
from prn.deploy.predict import Predictor  # noqa: E402
from prn.errors import PRNError  # noqa: E402
from prn.serve import build_app, check_binding, require_dependencies  # noqa: E402
from prn.serve.app import create_app  # noqa: E402
from prn.report import json_safe  # noqa: E402
from prn.serve.service import OVERLAY_MAX_SIDE, InspectionService, Limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fake_models import named_calibration_model  # noqa: E402

TOKEN = "a-test-token-of-some-length"
# (H, W) and how each is saved: the service decodes every kind as prn predict reads files
IMAGES = {"wide.png": ((40, 96), "RGB"), "tall.jpg": ((100, 72), "RGB"),
          "gray.png": ((50, 30), "L"), "rgba.png": ((33, 47), "RGBA")}


def _encode(array, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _image_bytes(name, hw, mode, seed):
    g = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = g.integers(0, 256, (*hw, channels), dtype=np.uint8)
    array[hw[0] // 4:hw[0] // 2, hw[1] // 2:, :min(channels, 3)] = 240  # a bright blob off-centre
    return _encode(array[..., 0] if mode == "L" else array, "JPEG" if name.endswith(".jpg") else "PNG")


@pytest.fixture(scope="module")
def uploads():
    return {name: _image_bytes(name, hw, mode, i) for i, (name, (hw, mode)) in enumerate(IMAGES.items())}


@pytest.fixture(scope="module")
def predictor(calibrated_run):
    return Predictor(calibrated_run)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(InspectionService(predictor))) as c:
        yield c


def _files(uploads, names=None):
    return [("files", (n, uploads[n], "application/octet-stream")) for n in (names or uploads)]


def _png(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _one(client, data, name="x.png", **params):
    r = client.post("/predict", params=params, files=[("files", (name, data, "image/png"))])
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


# ----------------------------------------------------------------------------- good requests

def test_decisions_equal_prn_predict_on_the_same_files(client, calibrated_run, uploads, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in uploads.items():
        (folder / name).write_bytes(data)
    api.predict(calibrated_run, folder, tmp_path / "out", maps="none", progress=False)
    want = {r["path"]: r for r in csv.DictReader(open(tmp_path / "out" / "scores.csv"))}
    got = {r["name"]: r for r in client.post("/predict", files=_files(uploads)).json()["results"]}
    assert got.keys() == want.keys() == uploads.keys()
    for name in uploads:
        assert abs(got[name]["score"] - float(want[name]["score"])) < 1e-6, name
        assert abs(got[name]["normalized_score"] - float(want[name]["normalized_score"])) < 1e-6, name
        assert got[name]["prediction"] == int(want[name]["prediction"]), name
        assert got[name]["review"] is None and want[name]["review"] == ""  # no review band: nothing said
    assert len({round(r["score"], 9) for r in got.values()}) == len(got)  # a real model, not a constant


def test_several_images_come_back_in_request_order_with_size_label_and_time(client, uploads, predictor):
    names = ["rgba.png", "wide.png", "tall.jpg"]
    body = client.post("/predict", files=_files(uploads, names)).json()
    assert [r["name"] for r in body["results"]] == names
    for r, name in zip(body["results"], names):
        (h, w), _ = IMAGES[name]
        assert (r["height"], r["width"]) == (h, w)
        assert r["threshold"] == predictor.threshold
        assert r["label"] == ("defective" if r["score"] >= predictor.threshold else "good")
        assert r["prediction"] == int(r["score"] >= predictor.threshold)
        assert r["milliseconds"] > 0 and "overlay" not in r and "mask" not in r
    assert body["milliseconds"] >= max(r["milliseconds"] for r in body["results"])


def test_mask_is_the_calibrated_pixel_threshold_at_the_images_own_size(client, uploads, predictor):
    r = _one(client, uploads["tall.jpg"], mask=1)
    image = read_image_bytes(uploads["tall.jpg"])
    amap = predictor.predict_arrays([image])[0]["map"]
    mask = _png(r["mask"])
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, amap >= predictor.pixel_threshold)


def test_overlay_is_an_rgb_png_of_the_image_size_capped_for_large_images(client, uploads):
    r = _one(client, uploads["wide.png"], overlay=1)
    assert _png(r["overlay"]).shape == (40, 96, 3)
    big = _encode(np.random.default_rng(1).integers(0, 256, (300, 1500, 3), dtype=np.uint8))
    overlay = _png(_one(client, big, overlay=1)["overlay"])
    assert overlay.shape == (round(300 * OVERLAY_MAX_SIDE / 1500), OVERLAY_MAX_SIDE, 3)


def test_model_reports_kind_input_thresholds_metrics_and_limits(client, calibrated_run, predictor):
    m = client.get("/model").json()
    assert (m["kind"], m["backbone"], m["input_size"]) == ("prn", "tf_efficientnet_lite0", [64, 64])
    assert m["calibrated"] and m["image_threshold"] == predictor.calibration["image_threshold"]
    assert m["pixel_threshold"] == predictor.calibration["pixel_threshold"]
    assert m["threshold_source"] == "calibration"
    results = json.loads((calibrated_run / "results.json").read_text())
    assert m["metrics"] == json_safe(results) and "image_auroc" in m["metrics"]["categories"]["demo"]
    assert m["versions"]["prn"] and m["limits"] == {"max_request_bytes": 32 * 2**20,
                                                    "max_pixels": 50_000_000, "max_images": 16}
    assert client.get("/health").json() == {"status": "ok", "model": "prn", "model_generation": 0}
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_the_calibrations_notes_and_its_named_images_are_served(calibrated_run, demo_root, tmp_path):
    model, goods = named_calibration_model(calibrated_run, demo_root, tmp_path / "run")
    with TestClient(build_app(model)) as c:
        m = c.get("/model").json()
        # what fit and prn calibrate print, with the run folder in the commands
        assert [n["level"] for n in m["calibration_notes"]] == ["warning", "note"]
        warning, note = (n["text"] for n in m["calibration_notes"])
        assert str(goods[0]) in warning and "--not-good" in warning and str(tmp_path / "run") in warning
        assert str(goods[1]) in note and "is the score of one held-out good image" in note
        # readable files only: the suspect whose file is gone is named in the text, not offered
        assert [(i["index"], i["why"], i["name"]) for i in m["held_out_images"]] == [
            (3, "suspect", goods[0].name), (1, "threshold", goods[1].name)]
        for index, path in ((3, goods[0]), (1, goods[1])):
            r = c.get(f"/model/held-out/{index}")
            assert r.status_code == 200 and r.content == path.read_bytes()
        for index in (2, 0, 99):                 # gone, or not named: nothing else is served
            r = c.get(f"/model/held-out/{index}")
            assert r.status_code == 404 and "not one the calibration names" in r.json()["error"]
        assert c.get("/model/held-out/one").status_code == 400             # a number, never a path
        assert c.get("/model/held-out/..%2F..%2Fmodel.pt").status_code == 404
        # the named image scores as an upload of its bytes
        r = c.post("/predict", files=[("files", (goods[1].name, goods[1].read_bytes(), "image/png"))])
        assert r.json()["model_generation"] == m["generation"] == 0     # no reload yet
        expected = Predictor(model).scores([read_image_bytes(goods[1].read_bytes(), goods[1].name)])[0]
        assert r.json()["results"][0]["score"] == pytest.approx(float(expected), abs=1e-6)
    # a threshold set when the server starts is not the calibration's: no notes, nothing offered
    with TestClient(build_app(model, threshold=0.5)) as c:
        m = c.get("/model").json()
        assert m["threshold_source"] == "set when the server started"
        assert m["calibration_notes"] == [] and m["held_out_images"] == []
        assert c.get("/model/held-out/1").status_code == 404


def test_page_and_its_files_are_served_by_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for ref in ("static/app.js", "static/style.css"):
        assert ref in page.text
        assert client.get("/" + ref).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing fetched from elsewhere


# ----------------------------------------------------------------------------- bad input

def _truncated_png():
    data = _encode(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return data[:len(data) // 2]


BAD_UPLOADS = {  # (name, content) -> (status, words the error must hold)
    "zero bytes": ("empty.png", b"", 422, ["'empty.png'", "empty"]),
    "not an image": ("notes.png", b"these are notes, not pixels", 422, ["'notes.png'", "not an image"]),
    "truncated": ("half.png", _truncated_png(), 422, ["'half.png'", "truncated"]),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload_alone_is_a_422_naming_the_file_and_the_problem(client, uploads, case):
    name, data, status, words = BAD_UPLOADS[case]
    before = _one(client, uploads["wide.png"])["score"]
    r = client.post("/predict", files=[("files", (name, data, "image/png"))])
    assert r.status_code == status
    body = r.json()
    assert body["status"] == status and "upload 1" in body["error"]
    for word in words:
        assert word in body["error"]
    assert _one(client, uploads["wide.png"])["score"] == before  # still serving, nothing kept


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_one_bad_upload_among_good_ones_gets_its_error_and_the_others_are_scored(client, uploads, case):
    name, data, _, words = BAD_UPLOADS[case]
    alone = {n: _one(client, uploads[n], name=n)["score"] for n in ("wide.png", "tall.jpg")}
    r = client.post("/predict", params={"overlay": 1, "mask": 1},
                    files=[("files", ("wide.png", uploads["wide.png"], "image/png")),
                           ("files", (name, data, "image/png")),
                           ("files", ("tall.jpg", uploads["tall.jpg"], "image/jpeg"))])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == ["wide.png", name, "tall.jpg"]  # request order
    bad = results[1]
    assert set(bad) == {"name", "error", "milliseconds"} and "upload 2" in bad["error"]
    for word in words:
        assert word in bad["error"]
    for good in (results[0], results[2]):
        assert "error" not in good and good["score"] == pytest.approx(alone[good["name"]], abs=1e-6)
        assert good["label"] in ("good", "defective") and good["overlay"] and good["mask"]


def test_several_bad_uploads_alone_are_a_422_naming_the_first(client):
    r = client.post("/predict", files=[("files", ("a.png", b"", "image/png")),
                                       ("files", ("b.png", b"not pixels", "image/png"))])
    assert r.status_code == 422 and "upload 1 ('a.png')" in r.json()["error"]


def test_the_field_file_is_accepted_as_files_is(client, uploads):
    one = client.post("/predict", files=[("file", ("wide.png", uploads["wide.png"], "image/png"))])
    assert one.status_code == 200, one.text
    both = client.post("/predict", files=[("file", ("wide.png", uploads["wide.png"], "image/png")),
                                          ("files", ("gray.png", uploads["gray.png"], "image/png"))])
    assert [x["name"] for x in both.json()["results"]] == ["wide.png", "gray.png"]
    assert both.json()["results"][0]["score"] == pytest.approx(one.json()["results"][0]["score"], abs=1e-6)


@pytest.mark.parametrize("kwargs, status, words", [
    (dict(files=[("image", ("a.png", b"x", "image/png"))]), 400, ["'image'", "'files'", "'file'"]),
    (dict(data={"files": "not a file"}, files=[("other", ("a", b"", "text/plain"))]), 400, ["field"]),
    (dict(content=b"\x89PNG...", headers={"content-type": "image/png"}), 415, ["multipart/form-data"]),
    (dict(data={"x": "1"}), 415, ["multipart/form-data"]),
])
def test_wrong_field_or_body_is_a_4xx_naming_what_to_send(client, kwargs, status, words):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["error"]


def test_multipart_without_files_is_a_400(client):
    r = client.post("/predict", content=b"--b--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and "no images" in r.json()["error"]


def test_query_parameter_of_the_wrong_type_is_a_400_naming_it(client, uploads):
    r = client.post("/predict", params={"overlay": "maybe"}, files=_files(uploads, ["wide.png"]))
    assert r.status_code == 400 and "overlay" in r.json()["error"]


@pytest.fixture(scope="module")
def small_limits_client(predictor):
    limits = Limits(max_request_bytes=20_000, max_pixels=60 * 60, max_images=2)
    with TestClient(create_app(InspectionService(predictor, limits))) as c:
        yield c


def test_image_over_the_pixel_limit_is_refused_by_name(small_limits_client, uploads):
    r = small_limits_client.post("/predict", files=_files(uploads, ["tall.jpg"]))  # 72 x 100 > 3600
    assert r.status_code == 422
    assert "'tall.jpg'" in r.json()["error"] and "3600" in r.json()["error"]
    assert small_limits_client.post("/predict", files=_files(uploads, ["gray.png"])).status_code == 200


def _pixel_limit_error(app, uploads):
    with TestClient(app) as c:
        r = c.post("/predict", files=_files(uploads, ["tall.jpg"]))      # 72 x 100 = 7200 pixels
    assert r.status_code == 422, r.text
    return r.json()["error"]


def test_the_pixel_limit_message_names_what_set_the_limit(calibrated_run, uploads, monkeypatch):
    message = _pixel_limit_error(build_app(calibrated_run, max_pixels=3600), uploads)
    assert "more than the limit of 3600 (--max-pixels)" in message
    assert "max_image_pixels" not in message
    # without --max-pixels the limit is the model's max_image_pixels (made small here)
    import prn.deploy.predict
    real = prn.deploy.predict.Predictor

    def small_model_limit(*args, **kwargs):
        predictor = real(*args, **kwargs)
        predictor.cfg = predictor.cfg.replace(max_image_pixels=5000)
        return predictor
    monkeypatch.setattr(prn.deploy.predict, "Predictor", small_model_limit)
    message = _pixel_limit_error(build_app(calibrated_run), uploads)
    assert "the limit of 5000 (the model's max_image_pixels; --max-pixels sets another)" in message


def test_request_over_the_size_limit_is_a_413_and_the_next_one_works(small_limits_client, uploads):
    big = _encode(np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8), "BMP")
    big = big + b"\0" * 25_000  # over 20,000 bytes, under the pixel limit
    r = small_limits_client.post("/predict", files=[("files", ("big.bmp", big, "image/bmp"))])
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]
    assert small_limits_client.post("/predict", files=_files(uploads, ["gray.png"])).status_code == 200


def test_a_body_streamed_without_length_is_cut_at_the_size_limit(small_limits_client):
    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(30):
            yield b"\0" * 1000
    r = small_limits_client.post("/predict", content=chunks(),
                                 headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_more_images_than_allowed_is_a_400(small_limits_client, uploads):
    r = small_limits_client.post("/predict", files=_files(uploads, ["gray.png"] * 3))
    assert r.status_code == 400 and "Too many files" in r.json()["error"]


def test_uncalibrated_model_scores_without_a_verdict_and_refuses_masks(calibrated_run, uploads, tmp_path):
    bare = tmp_path / "bare.pt"
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", bare)
    set_calibration(bare, None)
    with TestClient(build_app(bare)) as c:
        assert c.get("/model").json()["calibrated"] is False
        r = _one(c, uploads["wide.png"], overlay=1)
        assert r["prediction"] is None and r["label"] is None and r["normalized_score"] is None
        refused = c.post("/predict", params={"mask": 1}, files=_files(uploads, ["wide.png"]))
        assert refused.status_code == 409 and "calibrat" in refused.json()["error"]


def test_the_docs_page_loads_every_script_and_style_from_the_service_itself(client):
    import re
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:  # no CDN: a line PC has no internet
        assert asset.startswith("/"), asset
        assert client.get(asset).status_code == 200, asset


# ----------------------------------------------------------------------------- token

@pytest.fixture(scope="module")
def guarded(predictor):
    with TestClient(create_app(InspectionService(predictor), token=TOKEN)) as c:
        yield c


@pytest.mark.parametrize("path", ["/", "/health", "/model", "/model/held-out/0", "/static/app.js", "/docs",
                                  "/openapi.json"])
def test_with_a_token_every_request_without_it_is_a_401(guarded, path):
    r = guarded.get(path)
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert guarded.get(path, headers={"Authorization": "Bearer wrong-token"}).status_code == 401


def test_the_right_bearer_token_opens_every_route(guarded, uploads):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert guarded.get("/model", headers=auth).status_code == 200
    r = guarded.post("/predict", headers=auth, files=_files(uploads, ["wide.png"]))
    assert r.status_code == 200 and r.json()["results"][0]["name"] == "wide.png"
    assert guarded.post("/predict", files=_files(uploads, ["wide.png"])).status_code == 401


def test_opening_the_page_with_the_token_sets_a_cookie_the_page_then_uses(predictor):
    with TestClient(create_app(InspectionService(predictor), token=TOKEN)) as browser:
        assert browser.get("/", params={"token": "wrong"}, follow_redirects=False).status_code == 401
        r = browser.get("/", params={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303 and "token" not in r.headers["location"]
        assert "httponly" in r.headers["set-cookie"].lower()
        assert browser.get("/").status_code == 200          # the cookie, no header
        assert browser.get("/model").status_code == 200


# ----------------------------------------------------------------------------- one model

def test_the_model_runs_one_request_at_a_time_off_the_event_loop(predictor, uploads, monkeypatch):
    inside, most, release = [0], [0], threading.Event()
    original = predictor.predict_arrays
    lock = threading.Lock()

    def slow(images, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(5)
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return original(images, **kwargs)

    monkeypatch.setattr(predictor, "predict_arrays", slow)
    with TestClient(create_app(InspectionService(predictor))) as c:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(
            c.post("/predict", files=_files(uploads, ["wide.png"])).status_code)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        health = c.get("/health")                 # answered while a request holds the model
        assert health.status_code == 200 and not codes
        release.set()
        for t in threads:
            t.join(10)
    assert codes == [200] * 4 and most[0] == 1


def test_requests_that_wait_for_the_model_together_go_through_it_in_one_pass(predictor, uploads, monkeypatch):
    from prn.serve.service import _Job
    lone = {}
    with TestClient(create_app(InspectionService(predictor))) as c:
        for name in uploads:
            lone[name] = _one(c, uploads[name], name=name, overlay=1)
    passes, busy, release = [], threading.Event(), threading.Event()
    original = predictor.predict_arrays

    def held(images, **kwargs):  # the first pass holds the model until the others are queued
        passes.append(len(images))
        busy.set()
        release.wait(5)
        return original(images, **kwargs)

    monkeypatch.setattr(predictor, "predict_arrays", held)
    service = InspectionService(predictor)
    names = ["wide.png", "tall.jpg", "gray.png", "rgba.png"]
    overlays = {"wide.png": 1, "tall.jpg": 0, "gray.png": 1, "rgba.png": 0}  # the others ask for a mask
    with TestClient(create_app(service)) as c:
        got = {}

        def ask(name):
            got[name] = _one(c, uploads[name], name=name, overlay=overlays[name], mask=1 - overlays[name])
        first = threading.Thread(target=ask, args=(names[0],))
        first.start()
        assert busy.wait(5)
        others = [threading.Thread(target=ask, args=(n,)) for n in names[1:]]
        for t in others:
            t.start()
        deadline = time.monotonic() + 5
        while len(service._joined._pending) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for t in [first, *others]:
            t.join(10)
    assert passes == [1, 3]  # the three that waited went in one forward pass
    for name in names:  # each answer its own image's, as when it came alone, with what it asked for
        assert got[name]["name"] == name and abs(got[name]["score"] - lone[name]["score"]) < 1e-6
        assert ("overlay" in got[name]) == bool(overlays[name]) and ("mask" in got[name]) != bool(overlays[name])
        if overlays[name]:  # the same picture, to the rounding of a batch's float sums
            diff = np.abs(_png(got[name]["overlay"]).astype(int) - _png(lone[name]["overlay"]))
            assert diff.max() <= 4 and (diff > 0).mean() < 0.01
    # an image resized for a model swapped out meanwhile (its input size may differ) is resized again
    monkeypatch.setattr(predictor, "predict_arrays", original)
    image = read_image_bytes(uploads["tall.jpg"])
    stale = _Job([image], [np.zeros((8, 8, 3), np.uint8)], object(), False, False)
    (used, raw, _), = service._infer([stale])
    assert used is predictor and abs(raw[0]["score"] - predictor.scores([image])[0]) < 1e-6


# ----------------------------------------------------------------------------- CLI

def test_binding_beyond_this_machine_needs_a_long_token():
    check_binding("127.0.0.1", None)
    check_binding("localhost", None)
    check_binding("::1", None)
    for host in ("0.0.0.0", "192.168.1.20", "line-pc"):
        with pytest.raises(PRNError, match="token"):
            check_binding(host, None)
    with pytest.raises(PRNError, match="16 characters"):
        check_binding("0.0.0.0", "short")
    check_binding("0.0.0.0", TOKEN)


def test_cli_refuses_an_open_host_without_token(calibrated_run, capsys, monkeypatch):
    monkeypatch.delenv("PRN_SERVE_TOKEN", raising=False)
    assert main(["serve", str(calibrated_run), "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err


def test_a_port_out_of_range_or_taken_is_refused_before_the_model_loads(calibrated_run, capsys, monkeypatch):
    import socket

    import prn.serve as serve_module
    for port in ("0", "65536", "http"):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(calibrated_run), "--port", port])
        assert exit_info.value.code == 2 and "expected a port number from 1 to 65535" in capsys.readouterr().err
    monkeypatch.setattr(serve_module, "build_app", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", str(calibrated_run), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
    with pytest.raises(PRNError, match="from 1 to 65535"):
        serve_module.serve(calibrated_run, port=70000)


def test_cli_refuses_a_limit_below_one(calibrated_run, capsys):
    assert main(["serve", str(calibrated_run), "--max-images", "0"]) == 2
    assert "max_images must be a positive integer" in capsys.readouterr().err


def test_missing_serve_packages_are_named_with_the_install_command(monkeypatch, capsys, calibrated_run):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("uvicorn", "python_multipart") else real(name, *a))
    with pytest.raises(PRNError, match=r"uvicorn, python-multipart: pip install 'prn\[serve\]'"):
        require_dependencies()
    assert main(["serve", str(calibrated_run)]) == 1
    assert "prn[serve]" in capsys.readouterr().err


def test_the_model_is_loaded_run_and_reloaded_in_one_model_thread(calibrated_run, uploads, monkeypatch):
    import prn.deploy.predict as predict_module
    import prn.postprocess as postprocess_module
    import prn.serve.service as service_module
    threads = {"load": [], "forward": [], "resize": []}

    class Recording(Predictor):
        def __init__(self, *args, **kwargs):
            threads["load"].append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

        def predict_arrays(self, *args, **kwargs):
            threads["forward"].append(threading.current_thread().name)
            return super().predict_arrays(*args, **kwargs)

    def resize_map(*args):
        threads["resize"].append(threading.current_thread().name)
        return real_resize(*args)
    real_resize = service_module.resize_map
    monkeypatch.setattr(predict_module, "Predictor", Recording)
    monkeypatch.setattr(service_module, "resize_map", resize_map)  # the pictures' resize
    monkeypatch.setattr(postprocess_module, "resize_map", resize_map)  # the regions' (Postprocess.map_for)
    with TestClient(build_app(calibrated_run, corrections=False)) as c:
        for overlay in (0, 1):
            assert "score" in _one(c, uploads["wide.png"], overlay=overlay)
        assert c.post("/model/reload").status_code == 200
    assert len(threads["load"]) == 2 and len(threads["forward"]) == 2 and threads["resize"]
    names = {n for v in threads.values() for n in v}
    assert len(names) == 1 and names.pop().startswith("prn-model")
