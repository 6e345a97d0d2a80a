"""The one pre-process (prn.preprocess): Pillow's bilinear resize, bit for bit, in torch and in an
exported ONNX graph, and [0, 1] scaling as torchvision does it."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

from prn.data.sample import Sample
from prn.preprocess import (Detail, Preprocess, Resize, batches_of, defect_side, detail_width, rank_filter,
                            resize_image, to_tensor)


def pillow(image: np.ndarray, hw) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(hw[::-1], Image.Resampling.BILINEAR))


def random_sizes(n, seed):
    rng = np.random.default_rng(seed)
    return [(tuple(rng.integers(2, 700, 2)), tuple(rng.integers(2, 400, 2))) for _ in range(n)]


@pytest.mark.parametrize("src, dst", random_sizes(40, 0) + [
    ((500, 1250), (160, 384)), ((1250, 500), (384, 160)),   # KolektorSDD-like frames
    ((460, 1130), (160, 384)), ((64, 64), (64, 64)), ((1, 1), (5, 7)), ((3, 900), (32, 32))])
def test_resize_equals_pillows_bilinear_resize_bit_for_bit(src, dst):
    image = np.random.default_rng(src[0] * 7 + dst[1]).integers(0, 256, (*src, 3), dtype=np.uint8)
    assert np.array_equal(resize_image(image, dst), pillow(image, dst))


def test_resize_of_a_batch_resizes_each_image_and_keeps_uint8():
    images = torch.randint(0, 256, (3, 3, 90, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = Resize((32, 64))(images)
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 32, 64)
    for image, resized in zip(images, out):
        assert np.array_equal(resized.permute(1, 2, 0).numpy(), pillow(image.permute(1, 2, 0).numpy(), (32, 64)))


def test_preprocess_is_resize_then_torchvisions_scaling():
    images = torch.randint(0, 256, (2, 3, 50, 130), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = Preprocess((32, 64))(images)
    want = TF.to_dtype(Resize((32, 64))(images), torch.float32, scale=True)
    assert x.dtype == torch.float32 and torch.equal(x, want) and 0 <= x.min() and x.max() <= 1
    one = images[0].permute(1, 2, 0).numpy()
    assert torch.equal(to_tensor(resize_image(one, (32, 64))), x[0])
    assert torch.equal(next(batches_of([resize_image(one, (32, 64))], 4))[0], x[0])


def test_preprocess_refuses_what_is_not_a_batch_of_uint8_rgb_images():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Preprocess((32, 32))(torch.zeros(3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Preprocess((32, 32))(torch.zeros(1, 3, 40, 40))


def exported_session(resize: Resize, example_hw, folder):
    """``resize`` exported to ONNX with a dynamic batch and input size, as an onnxruntime session."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    example = torch.randint(0, 256, (2, 3, *example_hw), dtype=torch.uint8)
    dims = {0: torch.export.Dim("b", min=1, max=64), 2: torch.export.Dim("h", min=2, max=8192),
            3: torch.export.Dim("w", min=2, max=8192)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(resize, (example,), input_names=["images"], dynamo=True,
                                    dynamic_shapes={"images": dims}, opset_version=18, verbose=False)
    program.save(str(folder / "resize.onnx"))
    return ort.InferenceSession(str(folder / "resize.onnx"), providers=["CPUExecutionProvider"])


def test_exported_resize_equals_pillows_for_any_input_size(tmp_path):
    session = exported_session(Resize((48, 80)), (51, 83), tmp_path)
    for src, _ in random_sizes(12, 3) + [((500, 1250), None), ((30, 20), None)]:
        image = np.random.default_rng(src[1]).integers(0, 256, (*src, 3), dtype=np.uint8)
        (got,) = session.run(None, {"images": image.transpose(2, 0, 1)[None].copy()})
        assert np.array_equal(got[0].transpose(1, 2, 0), pillow(image, (48, 80))), src


def _files_of_every_mode(folder):
    """(path, what) of one file per way read_image converts: gray and RGB (the direct path),
    gray with a transparent value, palette, RGBA, 16-bit, CMYK JPEG and gray / colour JPEGs."""
    g = np.random.default_rng(11)
    rgb, gray = g.integers(0, 256, (57, 83, 3), dtype=np.uint8), g.integers(0, 256, (57, 83), dtype=np.uint8)
    pictures = {"rgb.png": Image.fromarray(rgb), "gray.png": Image.fromarray(gray),
                "gray.jpg": Image.fromarray(gray), "rgb.jpg": Image.fromarray(rgb),
                "palette.png": Image.fromarray(rgb).convert("P"),
                "rgba.png": Image.fromarray(g.integers(0, 256, (57, 83, 4), dtype=np.uint8)),
                "deep.png": Image.fromarray(g.integers(0, 65536, (57, 83), dtype=np.uint16)),
                "cmyk.jpg": Image.fromarray(rgb).convert("CMYK")}
    paths = []
    for name, picture in pictures.items():
        picture.save(folder / name)
        paths.append(folder / name)
    transparent = folder / "gray_transparent.png"
    Image.fromarray(gray).save(transparent, transparency=int(gray[0, 0]))
    return paths + [transparent]


@pytest.mark.parametrize("size", [(160, 384), (20, 30), (57, 83), (120, 200), 64])
def test_read_resized_equals_read_then_resize_bit_for_bit_for_every_mode(tmp_path, size):
    from prn.data.io import read_image
    from prn.preprocess import read_resized

    for path in _files_of_every_mode(tmp_path):
        image = read_image(path)
        got, hw = read_resized(path, size)
        assert hw == image.shape[:2], path.name
        assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous, path.name
        assert np.array_equal(got, resize_image(image, size)), path.name


def test_read_resized_checks_the_file_as_read_image_does(tmp_path):
    from prn.errors import DataError
    from prn.preprocess import read_resized

    with pytest.raises(DataError, match="missing.png: file not found"):
        read_resized(tmp_path / "missing.png", 32)
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(big)
    with pytest.raises(DataError, match="big.png: image is 50x40 = 2000 pixels"):
        read_resized(big, 32, max_pixels=1000)
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    with pytest.raises(DataError, match="cut.png: cannot decode image, the file is truncated"):
        read_resized(cut, 32)


# ----------------------------------------------------------------------------- the filter before the resize

def rank_filtered(image: np.ndarray, mode: str, width: int) -> np.ndarray:
    rank = ImageFilter.MinFilter if mode == "dark" else ImageFilter.MaxFilter
    return np.asarray(Image.fromarray(image).filter(rank(width)))


@pytest.mark.parametrize("mode", ["dark", "bright"])
@pytest.mark.parametrize("width", [3, 5])
@pytest.mark.parametrize("src, dst", random_sizes(5, 4) + [((460, 1130), (160, 384)), ((64, 64), (64, 64))])
def test_the_detail_filter_then_the_resize_equal_pillows_in_both_paths(mode, width, src, dst):
    image = np.random.default_rng(src[0] + width).integers(0, 256, (*src, 3), dtype=np.uint8)
    want = pillow(rank_filtered(image, mode, width), dst)
    detail = Detail(mode, width)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    if src == dst:  # an image at the input size passes as it is: filtered and resized already
        assert np.array_equal(resize_image(image, dst, detail), image)
        assert torch.equal(Resize(dst, detail)(batch), batch)
        return
    assert np.array_equal(resize_image(image, dst, detail), want)
    assert np.array_equal(Resize(dst, detail)(batch)[0].permute(1, 2, 0).numpy(), want)
    assert not np.array_equal(resize_image(image, dst), want)  # the filter changed something


def test_a_dark_pit_narrower_than_the_resize_step_keeps_its_contrast_only_with_the_dark_filter():
    image = np.full((300, 600, 3), 180, np.uint8)
    image[150:152, 301:303] = 40  # a 2 x 2 pit, 140 levels darker; the resize's step is 3
    contrast = {name: 180 - int(resize_image(image, (100, 200), d).min())
                for name, d in (("off", Detail()), ("dark", Detail("dark", 3)), ("bright", Detail("bright", 3)))}
    assert contrast["off"] < 50          # averaged into its neighbours (43 of 140)
    assert contrast["dark"] >= 100       # most of its depth in one pixel (110)
    assert contrast["bright"] == 0       # the bright filter erases a dark pit


def test_detail_width_follows_the_resize_step_and_detail_checks_its_values():
    assert detail_width((460, 1130), (160, 384)) == 3   # BSData's step, 2.9
    assert detail_width((500, 1250), (160, 384)) == 3   # KolektorSDD's, 3.1
    assert detail_width((1024, 1024), (256, 256)) == 5  # MVTec AD's, 4
    assert detail_width((300, 300), (256, 256)) == 0    # under 2: nothing to keep
    assert not Detail("dark", 1).active and not Detail("off", 3).active and Detail("bright", 3).active
    with pytest.raises(ValueError, match="odd"):
        Detail("dark", 4)
    with pytest.raises(ValueError, match="mode"):
        Detail("darker", 3)


def test_exported_resize_with_the_dark_filter_equals_pillows(tmp_path):
    session = exported_session(Resize((48, 80), Detail("dark", 3)), (151, 243), tmp_path)
    for src in [(500, 1250), (160, 250), (48, 80)]:
        image = np.random.default_rng(src[1]).integers(0, 256, (*src, 3), dtype=np.uint8)
        (got,) = session.run(None, {"images": image.transpose(2, 0, 1)[None].copy()})
        want = image if src == (48, 80) else pillow(rank_filtered(image, "dark", 3), (48, 80))
        assert np.array_equal(got[0].transpose(1, 2, 0), want), src


def spots(folder, sides, kind="defect"):
    """Samples of gray 60 x 80 pictures, each with a 4 x 4 spot 70 levels off its surface on the
    given side ("dark" or "bright") and its mask; ``None`` for a defect known by its label alone."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, side in enumerate(sides):
        image = np.full((60, 80), 128, np.uint8)
        image += np.random.default_rng(i).integers(0, 6, image.shape, dtype=np.uint8)
        image[20:24, 30:34] = 58 if side == "dark" else 198
        Image.fromarray(image).save(folder / f"{i}.png")
        if side is None:
            samples.append(Sample(folder / f"{i}.png", None, 1, kind, annotation="label"))
            continue
        mask = np.zeros_like(image)
        mask[20:24, 30:34] = 255
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
        samples.append(Sample(folder / f"{i}.png", folder / f"{i}_mask.png", 1, kind))
    return samples


def test_defect_side_is_the_side_three_quarters_of_the_masked_defects_are_on(tmp_path):
    assert defect_side(spots(tmp_path / "a", ["dark"] * 4))["mode"] == "dark"
    side = defect_side(spots(tmp_path / "b", ["bright"] * 3 + ["dark"]))
    assert (side["mode"], side["brighter"], side["darker"], side["masks"]) == ("bright", 3, 1, 4)
    assert defect_side(spots(tmp_path / "c", ["bright", "dark"] * 2))["mode"] == "off"
    side = defect_side(spots(tmp_path / "d", [None, None]))
    assert side["mode"] == "off" and "no seen defect with a pixel mask" in side["why"]


def test_fit_resolves_auto_and_a_width_of_0_once_before_any_image_is_read(tmp_path, capsys):
    from prn.config import PRNConfig
    from prn.data.split import Split
    from prn.runs import resolve_detail

    goods = tmp_path / "good"
    goods.mkdir()
    Image.fromarray(np.full((300, 600, 3), 128, np.uint8)).save(goods / "0.png")
    split = Split(train_normal=[Sample(goods / "0.png", None, 0, "good")], train_anomalous=spots(tmp_path / "seen", ["dark"] * 2),
                  test=[], dataset="mvtec", category="x", k=3, seed=0, val_anomalous=spots(tmp_path / "held", ["dark"]))

    def resolved(**kw):
        m = resolve_detail(PRNConfig(image_hw=(96, 192), **kw), split).model
        return m.resize_detail, m.detail_width

    assert resolved(resize_detail="auto") == ("dark", 3)        # 600 / 192: a step of 3.1
    assert resolved(resize_detail="bright") == ("bright", 3)
    assert resolved(resize_detail="dark", detail_width=5) == ("dark", 5)
    assert resolved() == ("off", 0)
    m = resolve_detail(PRNConfig(image_hw=(256, 512), resize_detail="dark"), split).model
    assert (m.resize_detail, m.detail_width, m.detail.active) == ("dark", 0, False)  # a step of 1.2: nothing to keep
    assert "no filter" in capsys.readouterr().err
    m = resolve_detail(PRNConfig(image_hw=(96, 192), resize_detail="dark", detail_width=1), split).model
    assert (m.detail_width, m.detail.active) == (1, False) and "step under 2" not in capsys.readouterr().err
    assert PRNConfig(resize_detail="auto").model.detail == Detail()  # not filtered before fit resolves it
    for bad in ({"resize_detail": "darker"}, {"detail_width": 4}, {"detail_width": -1}):
        with pytest.raises(Exception, match="resize_detail|detail_width"):
            PRNConfig(**bad)


@pytest.mark.parametrize("shape", [(1, 1), (2, 5, 3), (7, 3), (40, 33, 3), (100, 1), (3, 200)])
def test_rank_filter_equals_pillows_min_and_max_filters_at_every_edge(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    for width in (3, 5, 7):
        for darkest in (True, False):
            assert np.array_equal(rank_filter(image, width, darkest), rank_filtered(image, "dark" if darkest else "bright", width))
