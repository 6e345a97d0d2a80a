"""prn serve's defect regions and corrections through FastAPI's test client:
/predict lists each image's regions in its own pixels; POST /corrections stores a
result the server scored in the MVTec layout prn reads, never overwriting and never using a
client's text as a path; GET /corrections and /corrections.zip give them back; a token guards
them as it guards the rest."""

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="prn serve needs the serve extra: pip install 'prn[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from prn.cli import main  # noqa: E402
from prn.config import PRNConfig  # noqa: E402
from prn.data.io import read_image_bytes  # noqa: E402
from prn.data.layouts import load_index  # noqa: E402
from prn.serve import build_app, default_corrections_folder  # noqa: E402
from prn.serve.app import create_app  # noqa: E402
from prn.serve.corrections import CorrectionStore, RecentUploads, safe_stem  # noqa: E402
from prn.serve.service import InspectionService  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fake_models import brightness_predictor, drawn, region_boxes  # noqa: E402

TOKEN = "a-corrections-token-0123"
WIDE = ((128, 320), [(150, 20, 50, 20), (10, 100, 25, 16)])   # (H, W), drawn boxes (x, y, w, h)
ODD = ((90, 250), [(40, 10, 60, 30), (200, 60, 20, 20)])


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image(spec):
    return _png(drawn(*spec))


@pytest.fixture(scope="module")
def fake(calibrated_run):
    return brightness_predictor(calibrated_run)


def _app(predictor, folder, token=None, recent=None):
    store = CorrectionStore(folder, {"checkpoint": "model.pt", "model_kind": "prn", "pixel_threshold": 0.5})
    return create_app(InspectionService(predictor, corrections=store, recent=recent), token=token)


@pytest.fixture
def client(fake, tmp_path):
    with TestClient(_app(fake, tmp_path / "corrections")) as c:
        yield c


def _predict(client, name, data, **params):
    r = client.post("/predict", params=params, files=[("files", (name, data, "image/png"))])
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def _correct(client, result_id, label, mask=None, **fields):
    files = {"mask": ("mask.png", mask, "image/png")} if mask is not None else None
    return client.post("/corrections", data={"result": result_id, "label": label, **fields}, files=files)


def _mask(hw, box):
    x, y, w, h = box
    m = np.zeros(hw, np.uint8)
    m[y:y + h, x:x + w] = 255
    return m


# ----------------------------------------------------------------------------- regions

@pytest.mark.parametrize("spec", [WIDE, ODD])
def test_predict_returns_the_regions_of_drawn_defects_in_the_images_own_pixels(client, spec):
    r = _predict(client, "part.png", _image(spec))
    assert (r["height"], r["width"]) == spec[0]
    assert region_boxes(r["regions"]) == sorted(spec[1])
    for g in r["regions"]:
        assert set(g) == {"x", "y", "width", "height", "area", "peak", "mean"} and g["peak"] == 1.0


def test_a_minimum_region_area_per_request_or_per_server_drops_small_regions(fake, client, tmp_path):
    r = _predict(client, "part.png", _image(WIDE), min_region_area=500)
    assert region_boxes(r["regions"]) == [(150, 20, 50, 20)]          # the 25 x 16 one is gone
    bad = client.post("/predict", params={"min_region_area": 0},
                      files=[("files", ("a.png", _image(WIDE), "image/png"))])
    assert bad.status_code == 400 and "min_region_area" in bad.json()["error"]
    service = InspectionService(fake, min_region_area=500)
    with TestClient(create_app(service)) as c:
        assert len(_predict(c, "part.png", _image(WIDE))["regions"]) == 1
        assert c.get("/model").json()["min_region_area"] == 500


def test_an_uncalibrated_model_returns_no_regions_rather_than_a_guess(calibrated_run):
    raw = brightness_predictor(calibrated_run, calibration=None)
    with TestClient(create_app(InspectionService(raw))) as c:
        r = _predict(c, "part.png", _image(WIDE))
        assert r["regions"] is None and r["prediction"] is None


# ----------------------------------------------------------------------------- corrections

def test_a_missed_defect_is_stored_as_a_test_image_with_the_painted_mask(client, tmp_path):
    data = _image(ODD)
    r = _predict(client, "line 3/part 7.png", data)
    assert not (tmp_path / "corrections").exists()                   # nothing on disk until corrected
    mask = _mask(ODD[0], (100, 50, 30, 20))
    answer = _correct(client, r["id"], "defective", _png(mask), operator="ana", page_threshold="0.4",
                      page_verdict="good", note="scratch near the edge")
    assert answer.status_code == 201, answer.text
    record = answer.json()
    folder = tmp_path / "corrections"
    image, saved_mask = folder / record["image"], folder / record["mask"]
    assert record["image"].startswith("test/missed/part_7-") and record["image"].endswith(".png")
    assert record["mask"] == f"ground_truth/missed/{Path(record['image']).stem}_mask.png"
    np.testing.assert_array_equal(np.asarray(Image.open(image)), read_image_bytes(data))
    np.testing.assert_array_equal(np.asarray(Image.open(saved_mask)) > 0, mask > 0)
    assert record["mask_pixels"] == 600 and (record["width"], record["height"]) == (250, 90)
    assert record["label"] == "defective" and record["kind"] == "missed"
    assert record["upload"]["name"] == "line 3/part 7.png" and record["upload"]["result"] == r["id"]
    assert len(record["upload"]["sha256"]) == 64 and record["upload"]["bytes"] == len(data)
    assert record["model"]["score"] == r["score"] and record["model"]["label"] == r["label"]
    assert record["model"]["threshold"] == r["threshold"] and record["model"]["regions"] == 2
    assert record["model"]["checkpoint"] == "model.pt" and record["model"]["pixel_threshold"] == 0.5
    assert record["page"] == {"threshold": 0.4, "verdict": "good"} and record["note"] == "scratch near the edge"
    assert record["who"]["operator"] == "ana" and record["who"]["client"] and record["who"]["token"] is False
    assert record["time"].endswith("+00:00")
    lines = (folder / "corrections.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [record]
    listed = client.get("/corrections").json()
    assert listed == {"folder": str(folder), "count": 1, "corrections": [record]}


def test_a_false_reject_is_stored_as_a_good_training_image_without_a_mask(client, tmp_path):
    r = _predict(client, "fine.png", _image(WIDE))
    record = _correct(client, r["id"], "good").json()
    assert record["image"].startswith("train/good/fine-") and record["mask"] is None and record["kind"] is None
    assert (tmp_path / "corrections" / record["image"]).is_file()
    # an urlencoded form is accepted too: a good part needs no file
    r2 = _predict(client, "fine.png", _image(WIDE))
    plain = client.post("/corrections", content=f"result={r2['id']}&label=good",
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert plain.status_code == 201, plain.text
    assert plain.json()["image"] != record["image"]                 # same upload name, new file


def test_corrections_are_a_dataset_prn_reads_in_the_mvtec_layout(client, tmp_path):
    good = _predict(client, "ok.png", _image(WIDE))
    bad = _predict(client, "nok.png", _image(ODD))
    _correct(client, good["id"], "good")
    _correct(client, bad["id"], "defective", _png(_mask(ODD[0], (40, 10, 60, 30))), kind="scratch")
    index = load_index(PRNConfig(dataset="mvtec", root=str(tmp_path / "corrections"), category=""))
    assert [s.label for s in index.train] == [0]
    (defect,) = index.test
    assert defect.label == 1 and defect.defect_type == "scratch" and defect.mask_path.is_file()


def test_a_result_is_corrected_once_and_files_are_never_overwritten(client, tmp_path):
    r = _predict(client, "x.png", _image(WIDE))
    assert _correct(client, r["id"], "good").status_code == 201
    again = _correct(client, r["id"], "good")
    assert again.status_code == 409 and "already corrected" in again.json()["error"]
    names = {_correct(client, _predict(client, "x.png", _image(WIDE))["id"], "good").json()["image"]
             for _ in range(3)}
    assert len(names) == 3
    assert len(list((tmp_path / "corrections" / "train" / "good").iterdir())) == 4


def test_two_saves_of_one_result_at_once_store_it_once(tmp_path):
    import threading
    from prn.serve.corrections import CorrectionError, Scored
    store = CorrectionStore(tmp_path / "c", {})
    scored = Scored("r1", "a.png", _image(WIDE), 320, 128, {})
    outcomes, start = [], threading.Barrier(4)

    def save():
        start.wait()
        try:
            outcomes.append(store.save(scored, "good", who={})["id"])
        except CorrectionError as exc:
            outcomes.append(exc.status)
    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcomes.count(409) == 3 and len(outcomes) == 4 and len(store.records()) == 1
    assert len(list((tmp_path / "c" / "train" / "good").iterdir())) == 1


@pytest.mark.parametrize("name, stem", [("../../../etc/passwd", "passwd"), ("..\\..\\boot.ini", "boot"),
                                        ("", "image"), (".hidden.png", "hidden"), ("a b;c$(d).png", "a_b_c_d")])
def test_an_upload_name_never_becomes_a_path(client, tmp_path, name, stem):
    assert safe_stem(name) == stem
    r = _predict(client, name or "upload", _image(WIDE))
    record = _correct(client, r["id"], "good").json()
    path = (tmp_path / "corrections" / record["image"]).resolve()
    assert path.is_file() and path.parent == (tmp_path / "corrections" / "train" / "good").resolve()
    assert Path(record["image"]).name.startswith(f"{safe_stem(name or 'upload')}-")


def test_a_mask_painted_smaller_at_the_images_aspect_is_scaled_to_its_size(client, tmp_path):
    r = _predict(client, "wide.png", _image(WIDE))                     # 320 x 128
    small = _mask((64, 160), (75, 10, 25, 10))                          # half size
    record = _correct(client, r["id"], "defective", _png(small)).json()
    saved = np.asarray(Image.open(tmp_path / "corrections" / record["mask"])) > 0
    assert saved.shape == (128, 320) and saved[20:40, 150:200].all() and saved.sum() == 20 * 50


@pytest.mark.parametrize("case, fields, mask, status, words", [
    ("wrong label", {"label": "scrap"}, None, 422, ["'good' or 'defective'"]),
    ("no mask", {"label": "defective"}, None, 422, ["mask"]),
    ("empty mask", {"label": "defective"}, np.zeros((90, 250), np.uint8), 422, ["nothing is painted"]),
    ("other aspect", {"label": "defective"}, np.full((90, 90), 255, np.uint8), 422, ["90x90", "250x90"]),
    ("mask of a good part", {"label": "good"}, np.full((90, 250), 255, np.uint8), 422, ["no defect to paint"]),
    ("bad kind", {"label": "defective", "kind": "../x"}, np.full((90, 250), 255, np.uint8), 422, ["kind"]),
    ("kind good", {"label": "defective", "kind": "good"}, np.full((90, 250), 255, np.uint8), 422, ["not 'good'"]),
    ("long operator", {"label": "good", "operator": "x" * 300}, None, 422, ["operator", "at most 200"]),
    ("odd threshold", {"label": "good", "page_threshold": "high"}, None, 400, ["page_threshold"]),
    ("unknown field", {"label": "good", "path": "/etc"}, None, 400, ["'path'"]),
])
def test_a_bad_correction_is_refused_naming_the_problem_and_stores_nothing(client, tmp_path, case, fields, mask,
                                                                          status, words):
    r = _predict(client, "odd.png", _image(ODD))
    answer = _correct(client, r["id"], mask=None if mask is None else _png(mask), **fields)
    assert answer.status_code == status, answer.text
    for word in words:
        assert word in answer.json()["error"]
    assert not list((tmp_path / "corrections").rglob("*.png"))
    assert _correct(client, r["id"], "good").status_code == 201       # the result can still be corrected


def test_an_unknown_or_forgotten_result_is_refused_with_what_to_do(fake, tmp_path):
    with TestClient(_app(fake, tmp_path / "c", recent=RecentUploads(max_items=2))) as c:
        first = _predict(c, "a.png", _image(WIDE))
        for _ in range(2):
            _predict(c, "b.png", _image(WIDE))                         # pushes the first out
        gone = _correct(c, first["id"], "good")
        assert gone.status_code == 410 and "upload the image again" in gone.json()["error"]
        assert _correct(c, "no-such-id", "good").status_code == 410
        missing = c.post("/corrections", data={"label": "good"})
        assert missing.status_code == 400 and "'result'" in missing.json()["error"]


def test_held_uploads_are_bounded_by_count_and_bytes():
    from prn.serve.corrections import Scored
    recent = RecentUploads(max_items=10, max_bytes=250)
    for i in range(5):
        recent.add(Scored(str(i), "a.png", b"x" * 100, 1, 1, {}))
    assert len(recent) == 2                                            # 200 bytes held, the newest two
    assert recent.get("4") and recent.get("3")


def test_the_zip_holds_the_records_images_and_masks(client):
    r = _predict(client, "odd.png", _image(ODD))
    record = _correct(client, r["id"], "defective", _png(_mask(ODD[0], (1, 1, 5, 5)))).json()
    z = client.get("/corrections.zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    assert "prn-corrections.zip" in z.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert sorted(names) == sorted(["corrections.jsonl", record["image"], record["mask"]])


def test_with_a_token_corrections_need_it_too(fake, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(_app(fake, tmp_path / "c", token=TOKEN)) as c:
        r = c.post("/predict", headers=auth, files=[("files", ("a.png", _image(WIDE), "image/png"))]).json()
        rid = r["results"][0]["id"]
        for method, path in [("post", "/corrections"), ("get", "/corrections"), ("get", "/corrections.zip")]:
            answer = getattr(c, method)(path, data={"result": rid, "label": "good"}) if method == "post" \
                else c.get(path)
            assert answer.status_code == 401, path
        assert not (tmp_path / "c").exists()
        ok = c.post("/corrections", headers=auth, data={"result": rid, "label": "good"})
        assert ok.status_code == 201 and ok.json()["who"]["token"] is True
        assert c.get("/corrections", headers=auth).json()["count"] == 1


def test_with_corrections_off_nothing_is_kept_or_written(calibrated_run, tmp_path):
    with TestClient(build_app(calibrated_run, corrections=False)) as c:
        r = _predict(c, "a.png", _image(WIDE))
        assert "id" not in r and c.get("/model").json()["corrections"] is None
        assert c.get("/corrections").status_code == 404
        answer = c.post("/corrections", data={"result": "x", "label": "good"})
        assert answer.status_code == 404 and "--no-corrections" in answer.json()["error"]
    assert not (calibrated_run / "corrections").exists()


def test_the_corrections_folder_defaults_to_the_run_folder_or_beside_the_checkpoint(calibrated_run, tmp_path):
    assert default_corrections_folder(calibrated_run) == calibrated_run / "corrections"
    assert default_corrections_folder(calibrated_run / "checkpoints" / "model.pt") == calibrated_run / "corrections"
    assert default_corrections_folder(tmp_path / "model.pt") == tmp_path / "corrections"
    with TestClient(build_app(calibrated_run, corrections=tmp_path / "here")) as c:
        info = c.get("/model").json()["corrections"]
        assert info["folder"] == str(tmp_path / "here") and info["count"] == 0


def test_serve_refuses_a_corrections_folder_that_is_a_file(calibrated_run, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("x")
    assert main(["serve", str(calibrated_run), "--corrections", str(taken)]) == 4
    assert "notes.txt: the corrections folder is a file" in capsys.readouterr().err
