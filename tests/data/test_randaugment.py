"""Each RandAugment op against its definition, and the reference's argument mapping at M=5."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip_recipes.data import randaugment as ra

IMPLS = ["pil", "tensor"]


def _img(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _arr(img):
    """PIL image or uint8 (3, H, W) tensor -> int64 (H, W, 3) array."""
    if isinstance(img, torch.Tensor):
        return img.permute(1, 2, 0).numpy().astype(np.int64)
    return np.asarray(img).astype(np.int64)


def _tensor(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def _op(impl, name):
    """The op ``name`` of implementation ``impl``, taking and returning a PIL image."""
    if impl == "pil":
        return ra.OPS[name]

    def run(img, *args):
        out = ra.TENSOR_OPS[name](_tensor(img), *args)
        assert out.dtype == torch.uint8 and out.shape == (3, img.size[1], img.size[0])
        return Image.fromarray(out.permute(1, 2, 0).contiguous().numpy())

    return run


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


@pytest.mark.parametrize("impl", IMPLS)
def test_identity_brightness_sharpness_noops_at_m5(impl):
    img = _img()
    for name, args in [("Identity", ()), ("Brightness", (1.0,)), ("Sharpness", (1.0,))]:
        assert np.array_equal(_arr(_op(impl, name)(img, *args)), _arr(img))


@pytest.mark.parametrize("impl", IMPLS)
def test_brightness_definition(impl):
    img = _img()
    out = _arr(_op(impl, "Brightness")(img, 1.5))
    assert np.array_equal(out, np.clip((_arr(img) * 1.5).astype(np.int64), 0, 255))


@pytest.mark.parametrize("impl", IMPLS)
def test_autocontrast_definition(impl):
    arr = (np.arange(40 * 30 * 3).reshape(30, 40, 3) % 100 + 50).astype(np.uint8)
    arr[..., 2] = 77  # constant channel stays
    out = _arr(_op(impl, "AutoContrast")(Image.fromarray(arr)))
    for c in range(3):
        ch = arr[..., c].astype(np.float64)
        lo, hi = ch.min(), ch.max()
        if hi <= lo:
            ref = ch
        else:
            scale = 255.0 / (hi - lo)
            ref = np.clip(np.arange(256) * scale - lo * scale, 0, 255).astype(np.uint8)[arr[..., c]]
        assert np.array_equal(out[..., c], ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_equalize_definition(impl):
    img = _img(1)
    arr = np.asarray(img)
    out = _arr(_op(impl, "Equalize")(img))
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [5.0, -5.0])
def test_translate_definitions(impl, offset):
    img = _img()
    a = _arr(img)
    o = int(offset)
    out = _arr(_op(impl, "TranslateX")(img, offset))  # out(x, y) = in(x + offset, y)
    if o > 0:
        assert np.array_equal(out[:, :-o], a[:, o:]) and (out[:, -o:] == 128).all()
    else:
        assert np.array_equal(out[:, -o:], a[:, :o]) and (out[:, :-o] == 128).all()
    out = _arr(_op(impl, "TranslateY")(img, offset))  # out(x, y) = in(x, y + offset)
    if o > 0:
        assert np.array_equal(out[:-o], a[o:]) and (out[-o:] == 128).all()
    else:
        assert np.array_equal(out[-o:], a[:o]) and (out[:-o] == 128).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_shear_definitions(impl):
    # A shear by 0.15 maps row y by 0.15*y pixels: check on rows where that shift is an integer.
    img = _img(2, (60, 41))
    a = _arr(img)
    shear_x, shear_y = _op(impl, "ShearX"), _op(impl, "ShearY")
    out = _arr(shear_x(img, 0.15))  # out(x, y) = in(x - 0.15 y, y) (pixel-corner coordinates)
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
    out_y = _arr(shear_y(img.transpose(Image.Transpose.TRANSPOSE), 0.15))
    diff = np.abs(out_y.transpose(1, 0, 2) - out)  # ShearY is ShearX on the transpose
    assert diff.max() <= (0 if impl == "pil" else 1) and (diff > 0).mean() < 3e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_rotate_definition(impl):
    # A 90-degree counter-clockwise rotation of a square about its centre is exact.
    img = _img(3, (32, 32))
    rotate = _op(impl, "Rotate")
    out = rotate(img, 90)
    assert np.array_equal(_arr(out), _arr(img.transpose(Image.Transpose.ROTATE_90)))
    assert np.array_equal(_arr(rotate(img, 180)), _arr(img.transpose(Image.Transpose.ROTATE_180)))
    out = _arr(rotate(_img(3, (40, 30)), 15))
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


def _blocks(seed=6, size=(96, 72)):
    """Flat 8x8 colour blocks: warps of flat regions must keep their exact values."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


M5_AND_OTHER_ARGS = {
    "Identity": [()],
    "AutoContrast": [()],
    "Equalize": [()],
    "Brightness": [(1.0,), (1.5,), (0.3,)],
    "Sharpness": [(1.0,), (1.7,)],
    "ShearX": [(0.15,), (-0.15,)],
    "ShearY": [(0.15,), (-0.15,)],
    "TranslateX": [(5.0,), (-5.0,), (-300.0,), (2.5,)],
    "TranslateY": [(5.0,), (-5.0,), (0.7,)],
    "Rotate": [(15.0,), (-15.0,), (90.0,), (180.0,), (33.3,)],
}


def _affine_reference(img, data):
    """Pillow's bilinear affine warp by its definition, in float64: output pixel (x, y) samples
    the source at pixel-corner point (a (x+.5) + b (y+.5) + c, d (x+.5) + e (y+.5) + f), bilinear
    between pixel centres with neighbours clamped to the image, FILL where the point is outside
    [0, w) x [0, h), the value truncated (``floor(v + 1e-9)``: exact-arithmetic integers stay)."""
    arr = np.asarray(img).astype(np.float64)
    h, w = arr.shape[:2]
    a, b, c, d, e, f = data
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    sx, sy = a * xs + b * ys + c, d * xs + e * ys + f
    outside = (sx < 0) | (sx >= w) | (sy < 0) | (sy >= h)
    x0, y0 = np.floor(sx - 0.5).astype(int), np.floor(sy - 0.5).astype(int)
    dx, dy = (sx - 0.5 - x0)[..., None], (sy - 0.5 - y0)[..., None]
    xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    top = arr[ya, xa] + (arr[ya, xb] - arr[ya, xa]) * dx
    bottom = arr[yb, xa] + (arr[yb, xb] - arr[yb, xa]) * dx
    out = np.floor(top + (bottom - top) * dy + 1e-9)
    out[outside] = ra.FILL[0]
    return out.astype(np.int64)


def _warp_data(name, args, size):
    if name == "Rotate":
        return ra.rotation_matrix(*size, args[0])
    return {
        "ShearX": (1, -args[0], 0, 0, 1, 0),
        "ShearY": (1, 0, 0, -args[0], 1, 0),
        "TranslateX": (1, 0, args[0], 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, args[0]),
    }[name]


@pytest.mark.parametrize("name", ra.BLIP_OPS)
def test_tensor_ops_match_pillow_ops_and_definitions(name):
    """The tensor ops the train transform uses: lookup-table ops and integer shifts identical to
    Pillow's; warps within 1 of the float64 definition on under 3 values in 10^3."""
    images = [_img(7, (40, 30)), _img(8, (61, 41)), _blocks(), _blocks(9, (224, 224))]
    for args in M5_AND_OTHER_ARGS[name]:
        warp = name in ("ShearX", "ShearY", "Rotate") or (
            name.startswith("Translate") and not float(args[0]).is_integer()
        )
        for img in images:
            ref = _arr(ra.OPS[name](img, *args))
            out = _arr(ra.TENSOR_OPS[name](_tensor(img), *args))
            if not warp:
                assert np.array_equal(out, ref), (name, args)
                continue
            exact = _affine_reference(img, _warp_data(name, args, img.size))
            ours = np.abs(out - exact)
            assert ours.max() <= 1 and (ours > 0).mean() < 3e-3, (name, args, (ours > 0).mean())
            # Pillow's double arithmetic lands just under exact integers more often (up to 4% of
            # values for a 0.7 px shift of noise): ours is the closer of the two to the definition
            pil = np.abs(ref - exact)
            assert pil.max() <= 1 and (pil > 0).mean() < 0.05
            assert (ours > 0).mean() <= (pil > 0).mean() + 2e-3


@pytest.mark.parametrize(
    "name,data", [("ShearX", (1.0, -0.15, 0.0, 0.0, 1.0, 0.0)), ("Rotate", None)]
)
def test_tensor_warp_fill_is_exact(name, data):
    img = _img(10, (40, 30))
    w, h = img.size
    if data is None:
        data = ra.rotation_matrix(w, h, 15.0)
        out = _arr(ra.rotate_t(_tensor(img), 15.0))
    else:
        out = _arr(ra.shear_x_t(_tensor(img), 0.15))
    a, b, c, d, e, f = data
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    sx, sy = a * xs + b * ys + c, d * xs + e * ys + f
    outside = (sx < 0) | (sx >= w) | (sy < 0) | (sy >= h)
    assert outside.any() and (out[outside] == 128).all()


def test_randaugment_tensor_equals_pil():
    """Same draws, tensor ops vs Pillow ops, over many seeds (the train transform's path)."""
    aug = ra.RandAugment(2, 5)
    img = _blocks(11, (64, 48))
    worst, changed, total, count = 0, 0, 0.0, 0
    for seed in range(200):
        ops = aug.draw(random.Random(seed))
        out = _arr(aug(_tensor(img), random.Random(seed)))
        ref = _arr(aug(img, random.Random(seed)))
        diff = np.abs(out - ref)
        total, count = total + diff.mean(), count + 1
        names = [name for name, _ in ops]
        if names[-1:] not in (["AutoContrast"], ["Equalize"]):
            worst = max(worst, diff.max())
        changed += not np.array_equal(ref, _arr(img))
    # A warp's +-1 can move AutoContrast's min/max or Equalize's histogram, which then changes
    # whole lookup tables: bound the mean, and the worst case where no lookup op follows a warp.
    assert total / count < 0.05 and worst <= 2 and changed > 50


def test_draw_consumes_rng_like_the_reference_and_drops_noops():
    aug = ra.RandAugment(2, 5)
    dropped = 0
    for seed in range(300):
        rng = random.Random(seed)
        chosen = [rng.choice(ra.BLIP_OPS) for _ in range(2)]
        reference = []
        for name in chosen:
            if rng.random() > 0.5:
                continue
            reference.append((name, ra.op_arguments(name, 5, rng)))
        mine = random.Random(seed)
        ops = aug.draw(mine)
        assert mine.getstate() == rng.getstate()
        kept = [op for op in reference if op[0] not in ("Identity", "Brightness", "Sharpness")]
        assert ops == kept
        dropped += len(reference) - len(kept)
    assert dropped > 0
