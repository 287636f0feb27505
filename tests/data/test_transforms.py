import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.data import (
    IMAGE_MEAN,
    IMAGE_STD,
    BadImage,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    open_image,
)
from blip_recipes.data.transforms import random_resized_crop_params, to_rgb


def _jpeg(size=(640, 480), seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_crop_params_geometry():
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_params(300, 200, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
        assert 0.2 * 300 * 200 * 0.9 <= w * h <= 300 * 200
    # Fallback: a very wide image gives a centre crop with the aspect clamped to 4/3.
    assert random_resized_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (
        493,
        0,
        13,
        10,
    )


def test_train_transform_shape_dtype_determinism():
    t = build_train_transform(64)
    data = _jpeg()
    a = t(open_image(data), random.Random(3))
    b = t(open_image(data), random.Random(3))
    c = t(open_image(data), random.Random(4))
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_draft_decoding_is_close_to_full_decoding():
    data = _jpeg((1024, 768))
    fast = build_train_transform(64, randaugment=False)
    slow = build_train_transform(64, randaugment=False, use_draft=False)
    for seed in range(5):
        a = fast(open_image(data), random.Random(seed)).float()
        b = slow(open_image(data), random.Random(seed)).float()
        assert (a - b).abs().mean() < 6.0


def test_crop_without_augment_matches_pil_crop_resize():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    t = build_train_transform(32, randaugment=False)
    rng = random.Random(11)
    out = t(img, rng)
    rng = random.Random(11)
    left, top, w, h = random_resized_crop_params(70, 50, (0.2, 1.0), (3 / 4, 4 / 3), rng)
    ref = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(out, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))


def test_hflip_happens_half_the_time():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3)) * 4)
    t = build_train_transform(16, min_scale=1.0, randaugment=False)
    flips = 0
    for s in range(200):
        out = t(img, random.Random(s))[0, 8]
        flips += int(out[0] > out[-1])
    assert 70 < flips < 130


def test_eval_transform():
    data = _jpeg((100, 50))
    out = build_eval_transform(32)(data)
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    assert torch.equal(out, torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_modes_convert_to_rgb(mode, tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    img = img.convert(mode) if mode != "I;16" else img.convert("L").convert("I;16")
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = build_train_transform(16)(open_image(str(path)), random.Random(0))
    assert out.shape == (3, 16, 16)
    assert to_rgb(Image.open(path)).mode == "RGB"


def test_alpha_composited_over_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_bad_images(tmp_path):
    t = build_train_transform(16)
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = _jpeg()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (1000, 10)).save(tmp_path / "wide.png")
    for name, match in [
        ("missing.jpg", "missing"),
        ("empty.jpg", "zero-sized"),
        ("junk.jpg", "cannot open"),
        ("wide.png", "aspect"),
        ("trunc.jpg", "cannot decode"),
    ]:
        with pytest.raises(BadImage, match=match):
            t(open_image(str(tmp_path / name)), random.Random(0))


def test_normalize_images():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = normalize_images(x, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    assert torch.allclose(out.float(), (x.float() / 255 - mean) / std, atol=0.05)
