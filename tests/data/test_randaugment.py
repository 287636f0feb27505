"""Each RandAugment op against its definition, and the reference's argument mapping at M=5."""

import random

import numpy as np
import pytest
from PIL import Image

from blip_recipes.data import randaugment as ra


def _img(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _arr(img):
    return np.asarray(img).astype(np.int64)


def test_blip_ops_and_magnitudes_at_m5():
    assert ra.BLIP_OPS == (
        "Identity",
        "AutoContrast",
        "Brightness",
        "Sharpness",
        "Equalize",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    )
    rng = random.Random(0)
    assert ra.op_arguments("Brightness", 5, rng) == (1.0,)
    assert ra.op_arguments("Sharpness", 5, rng) == (1.0,)
    expected = {"ShearX": 0.15, "ShearY": 0.15, "TranslateX": 5.0, "TranslateY": 5.0, "Rotate": 15}
    for name, magnitude in expected.items():
        values = {ra.op_arguments(name, 5, rng)[0] for _ in range(200)}
        assert values == {magnitude, -magnitude}
    assert ra.FILL == (128, 128, 128)


def test_identity_brightness_sharpness_noops_at_m5():
    img = _img()
    for op in (ra.identity, lambda x: ra.brightness(x, 1.0), lambda x: ra.sharpness(x, 1.0)):
        assert np.array_equal(_arr(op(img)), _arr(img))


def test_brightness_definition():
    img = _img()
    out = _arr(ra.brightness(img, 1.5))
    assert np.array_equal(out, np.clip((_arr(img) * 1.5).astype(np.int64), 0, 255))


def test_autocontrast_definition():
    arr = (np.arange(40 * 30 * 3).reshape(30, 40, 3) % 100 + 50).astype(np.uint8)
    arr[..., 2] = 77  # constant channel stays
    out = _arr(ra.autocontrast(Image.fromarray(arr)))
    for c in range(3):
        ch = arr[..., c].astype(np.float64)
        lo, hi = ch.min(), ch.max()
        if hi <= lo:
            ref = ch
        else:
            scale = 255.0 / (hi - lo)
            ref = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)[arr[..., c]]
        assert np.array_equal(out[..., c], ref)


def test_equalize_definition():
    img = _img(1)
    arr = np.asarray(img)
    out = _arr(ra.equalize(img))
    for c in range(3):
        hist = np.bincount(arr[..., c].ravel(), minlength=256)
        nz = hist[hist != 0]
        step = nz[:-1].sum() // 255
        if step == 0:
            ref = arr[..., c]
        else:
            n = np.empty(256, dtype=np.int64)
            n[0] = step // 2
            n[1:] = hist[:-1]
            ref = np.clip(np.cumsum(n) // step, 0, 255).astype(np.uint8)[arr[..., c]]
        assert np.array_equal(out[..., c], ref)


@pytest.mark.parametrize("offset", [5.0, -5.0])
def test_translate_definitions(offset):
    img = _img()
    a = _arr(img)
    o = int(offset)
    out = _arr(ra.translate_x(img, offset))  # out(x, y) = in(x + offset, y)
    if o > 0:
        assert np.array_equal(out[:, :-o], a[:, o:]) and (out[:, -o:] == 128).all()
    else:
        assert np.array_equal(out[:, -o:], a[:, :o]) and (out[:, :-o] == 128).all()
    out = _arr(ra.translate_y(img, offset))  # out(x, y) = in(x, y + offset)
    if o > 0:
        assert np.array_equal(out[:-o], a[o:]) and (out[-o:] == 128).all()
    else:
        assert np.array_equal(out[-o:], a[:o]) and (out[:-o] == 128).all()


def test_shear_definitions():
    # A shear by 0.15 maps row y by 0.15*y pixels: check on rows where that shift is an integer.
    img = _img(2, (60, 41))
    a = _arr(img)
    out = _arr(ra.shear_x(img, 0.15))  # out(x, y) = in(x - 0.15 y, y) (pixel-corner coordinates)
    for y in (0, 20, 40):
        # Pillow samples at pixel centres: shift of row y is 0.15 * (y + 0.5) pixels.
        shift = 0.15 * (y + 0.5)
        xs = np.arange(60) + 0.5 - shift - 0.5
        valid = (xs >= 0) & (xs <= 59)
        lo = np.floor(xs[valid]).astype(int)
        frac = xs[valid] - lo
        hi = np.minimum(lo + 1, 59)
        ref = a[y, lo] * (1 - frac[:, None]) + a[y, hi] * frac[:, None]
        assert np.abs(out[y, valid] - ref).max() <= 1.01
        assert (out[y, xs < -1] == 128).all()
    out_y = _arr(ra.shear_y(img.transpose(Image.Transpose.TRANSPOSE), 0.15))
    assert np.array_equal(out_y.transpose(1, 0, 2), out)  # ShearY is ShearX on the transpose


def test_rotate_definition():
    # A 90-degree counter-clockwise rotation of a square about its centre is exact.
    img = _img(3, (32, 32))
    out = ra.rotate(img, 90)
    assert np.array_equal(_arr(out), _arr(img.transpose(Image.Transpose.ROTATE_90)))
    out = _arr(ra.rotate(_img(3, (40, 30)), 15))
    assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()  # corners filled grey


def test_randaugment_deterministic_and_samples_ops():
    aug = ra.RandAugment(2, 5)
    img = _img(4)
    a = _arr(aug(img, random.Random(7)))
    b = _arr(aug(img, random.Random(7)))
    assert np.array_equal(a, b)
    changed = sum(
        not np.array_equal(_arr(aug(img, random.Random(s))), _arr(img)) for s in range(50)
    )
    assert 10 < changed < 50  # each op applies with p 0.5 and some ops are no-ops


def test_integer_translate_fast_path_equals_affine_warp():
    img = _img(5)
    for offset in (5.0, -5.0, 3.0):
        assert np.array_equal(
            _arr(ra.translate_x(img, offset)), _arr(ra._affine(img, (1, 0, offset, 0, 1, 0)))
        )
        assert np.array_equal(
            _arr(ra.translate_y(img, offset)), _arr(ra._affine(img, (1, 0, 0, 0, 1, offset)))
        )
