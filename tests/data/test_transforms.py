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
from blip_recipes.data.transforms import (
    draft_scale,
    random_resized_crop_params,
    reduced_box,
    resized_crop,
    to_rgb,
)


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


def _bicubic_weights(in_size, out_size):
    """Pillow's BICUBIC filter as a matrix: a = -0.5, support 2 * max(scale, 1), taps clipped to
    the input, each row normalised (Resample.c ``precompute_coeffs``)."""
    scale = in_size / out_size
    fs = max(scale, 1.0)
    w = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - 2 * fs + 0.5), 0)
        hi = min(int(center + 2 * fs + 0.5), in_size)
        x = np.abs((np.arange(lo, hi) - center + 0.5) / fs)
        k = np.where(
            x < 1,
            (1.5 * x - 2.5) * x * x + 1,
            np.where(x < 2, -0.5 * ((x - 5) * x + 8) * x + 2, 0.0),
        )
        w[i, lo:hi] = k / k.sum()
    return w


def _bicubic_reference(arr, size):
    """Separable bicubic resize of an (H, W, 3) uint8 array by the definition, in float64:
    horizontal pass rounded and clipped to uint8, then the vertical pass."""
    a = arr.astype(np.float64)
    if a.shape[1] != size:
        a = np.clip(
            np.floor(np.einsum("ow,hwc->hoc", _bicubic_weights(a.shape[1], size), a) + 0.5), 0, 255
        )
    if a.shape[0] != size:
        a = np.clip(
            np.floor(np.einsum("oh,hwc->owc", _bicubic_weights(a.shape[0], size), a) + 0.5), 0, 255
        )
    return a.astype(np.uint8)


@pytest.mark.parametrize(
    "size", [(70, 50, 32), (50, 70, 32), (300, 200, 64), (20, 30, 64), (64, 64, 64)]
)
def test_resized_crop_matches_bicubic_definition(size):
    w, h, s = size
    arr = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = resized_crop(img, (0, 0, w, h), s)
    assert out.shape == (3, s, s) and out.dtype == torch.uint8 and out.is_contiguous()
    ours = out.permute(1, 2, 0).numpy().astype(int)
    ref = _bicubic_reference(arr, s).astype(int)
    # torch's uint8 kernel: fixed-point weights, so a value on a rounding boundary may differ by 1
    assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 0.01
    pil = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC)).astype(int)
    # Pillow is the same filter but may run the vertical pass first (other uint8 intermediate)
    assert np.abs(ours - pil).mean() < 0.5


def test_crop_without_augment_matches_crop_then_resize():
    """Train transform without RandAugment = crop the sampled box, bicubic resize, maybe flip."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    t = build_train_transform(32, randaugment=False)
    flips = 0
    for seed in range(20):
        rng = random.Random(seed)
        out = t(img, rng)
        rng = random.Random(seed)
        left, top, w, h = random_resized_crop_params(70, 50, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        ref = _bicubic_reference(np.asarray(img)[top : top + h, left : left + w], 32)
        if rng.random() < 0.5:
            ref, flips = ref[:, ::-1], flips + 1
        ref = torch.from_numpy(ref.copy()).permute(2, 0, 1).int()
        assert (out.int() - ref).abs().max() <= 1 and (out.int() != ref).float().mean() < 0.01
    assert 0 < flips < 20


def test_draft_path_resizes_the_exact_box_and_snap_option():
    data = _jpeg((1024, 768))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    exact = build_train_transform(64, randaugment=False)
    snap = build_train_transform(64, randaugment=False, draft_snap=True)
    drafted = 0
    for seed in range(10):
        rng = random.Random(seed)
        crop = random_resized_crop_params(1024, 768, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        flip = rng.random() < 0.5
        d = draft_scale(crop[2], crop[3], 64)
        drafted += d > 1
        a = exact(open_image(data), random.Random(seed))
        b = snap(open_image(data), random.Random(seed))
        if d == 1:
            assert torch.equal(a, b)
            continue
        reduced = (-(-1024 // d), -(-768 // d))
        x0, y0, w, h = reduced_box(crop, (1024, 768), reduced, d)
        # the snapped box: each edge within half a reduced pixel, still >= s pixels per side
        for got, want in [
            (x0, crop[0]),
            (y0, crop[1]),
            (x0 + w, crop[0] + crop[2]),
            (y0 + h, crop[1] + crop[3]),
        ]:
            assert abs(got - want / d) <= 0.5
        assert w >= 64 and h >= 64
        # snap = full decoding of the snapped box up to DCT-scaling vs bicubic
        ref = resized_crop(full, (x0 * d, y0 * d, (x0 + w) * d, (y0 + h) * d), 64)
        ref = ref.flip(-1) if flip else ref
        assert (b.float() - ref.float()).abs().mean() < 3.0
    assert drafted >= 5


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


def test_too_small_images_are_bad():
    t = build_train_transform(16)
    for size in [(1, 1), (7, 100), (100, 7)]:
        with pytest.raises(BadImage, match=f"too small {size[0]}x{size[1]}"):
            t(Image.new("RGB", size), random.Random(0))
    assert t(Image.new("RGB", (8, 8)), random.Random(0)).shape == (3, 16, 16)
    lenient = build_train_transform(16, min_image_size=1)
    assert lenient(Image.new("RGB", (1, 1)), random.Random(0)).shape == (3, 16, 16)
    strict = build_train_transform(16, min_image_size=64)
    with pytest.raises(BadImage, match="below 64 px"):
        strict(Image.new("RGB", (63, 200)), random.Random(0))


def test_normalize_images():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = normalize_images(x, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    assert torch.allclose(out.float(), (x.float() / 255 - mean) / std, atol=0.05)
