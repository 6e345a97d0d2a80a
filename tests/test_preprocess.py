"""The one pre-process (prn.preprocess): Pillow's bilinear resize, bit for bit, in torch and in an
exported ONNX graph, and [0, 1] scaling as torchvision does it."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from prn.preprocess import Preprocess, Resize, batches_of, resize_image, to_tensor


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


def test_exported_resize_equals_pillows_for_any_input_size(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    resize = Resize((48, 80))
    example = torch.randint(0, 256, (2, 3, 51, 83), dtype=torch.uint8)
    dims = {0: torch.export.Dim("b", min=1, max=64), 2: torch.export.Dim("h", min=2, max=8192),
            3: torch.export.Dim("w", min=2, max=8192)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(resize, (example,), input_names=["images"], dynamo=True,
                                    dynamic_shapes={"images": dims}, opset_version=18, verbose=False)
    program.save(str(tmp_path / "resize.onnx"))
    session = ort.InferenceSession(str(tmp_path / "resize.onnx"), providers=["CPUExecutionProvider"])
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
