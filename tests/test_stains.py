"""Validation of one sample's stain images (schemas.stains)."""

import io

import numpy as np
import pytest
from PIL import Image

import schemas
from schemas import stains
from tests import fixtures


def _stains(size=16, seed=0):
    return {s: fixtures.png_bytes(fixtures.stain_array(seed + k, size)) for k, s in enumerate(schemas.STAINS)}


def _encode(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_png_bytes_kept_untouched_and_stats():
    data = _stains()
    out = stains.validate_stains(data)
    assert out.images == data
    assert (out.height, out.width) == (16, 16)
    for k in range(schemas.NUM_STAINS):
        arr = fixtures.stain_array(k, 16).astype(np.float64)
        assert out.mean[k] == pytest.approx(arr.mean())
        assert out.sq_mean[k] == pytest.approx((arr**2).mean())
    assert out.conversions == ("",) * 4


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.pop("yellow"), stains.MISSING_STAIN),
        (lambda d: d.__setitem__("red", b""), stains.EMPTY_IMAGE),
        (lambda d: d.__setitem__("green", d["green"][: len(d["green"]) // 2]), stains.CORRUPT_IMAGE),
        (lambda d: d.__setitem__("blue", b"not an image at all"), stains.CORRUPT_IMAGE),
        (
            lambda d: d.__setitem__("blue", fixtures.png_bytes(fixtures.stain_array(9, 20))),
            stains.SIZE_MISMATCH,
        ),
        (
            lambda d: d.update({s: fixtures.png_bytes(fixtures.stain_array(1, 4)) for s in schemas.STAINS}),
            stains.TOO_SMALL,
        ),
    ],
    ids=["missing", "empty", "truncated", "garbage", "size_mismatch", "tiny"],
)
def test_rejections(mutate, reason):
    data = _stains()
    mutate(data)
    with pytest.raises(stains.Rejected) as e:
        stains.validate_stains(data)
    assert e.value.reason == reason and e.value.detail


def test_rgb_converted_to_max_channel_or_rejected_when_strict():
    gray = fixtures.stain_array(3, 16)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = gray  # the atlas' colour-coded green download
    data = _stains()
    data["green"] = _encode(Image.fromarray(rgb, "RGB"))
    out = stains.validate_stains(data)
    assert out.conversions[schemas.STAINS.index("green")] == "rgb"
    decoded = np.asarray(Image.open(io.BytesIO(out.images["green"])))
    np.testing.assert_array_equal(decoded, gray)
    with pytest.raises(stains.Rejected) as e:
        stains.validate_stains(data, strict_modes=True)
    assert e.value.reason == stains.UNSUPPORTED_MODE


def test_16bit_scaled_to_8bit():
    arr16 = (fixtures.stain_array(5, 16).astype(np.uint16) * 257).astype(np.uint16)
    data = _stains()
    data["red"] = _encode(Image.fromarray(arr16, "I;16"))
    out = stains.validate_stains(data)
    assert out.conversions[0] == "16bit"
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(out.images["red"]))), fixtures.stain_array(5, 16)
    )
    with pytest.raises(stains.Rejected):
        stains.validate_stains(data, strict_modes=True)


def test_tiff_reencoded_as_png_jpeg_kept():
    data = _stains()
    data["yellow"] = _encode(Image.fromarray(fixtures.stain_array(7, 16)), "TIFF")
    jpeg = _encode(Image.fromarray(fixtures.stain_array(8, 16)), "JPEG")
    data["blue"] = jpeg
    out = stains.validate_stains(data)
    assert out.images["yellow"][:8] == b"\x89PNG\r\n\x1a\n"
    assert out.images["blue"] == jpeg
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(out.images["yellow"]))), fixtures.stain_array(7, 16)
    )


def test_resize_reencodes_all_stains():
    out = stains.validate_stains(_stains(size=32), image_size=16)
    assert (out.height, out.width) == (16, 16)
    for s in schemas.STAINS:
        assert Image.open(io.BytesIO(out.images[s])).size == (16, 16)
    assert all("resized" in n for n in out.conversions)
    # asking for the size the images already have keeps the source bytes
    data = _stains(size=16)
    assert stains.validate_stains(data, image_size=16).images == data


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_header_size_reads_only_the_first_bytes(fmt):
    arr = np.zeros((40, 72), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    data = buf.getvalue()
    head = data[: min(len(data), 1024)] if fmt != "TIFF" else data
    assert stains.header_size(head) == (40, 72)
    assert stains.header_size(b"not an image") is None


def test_estimate_png_bytes_is_close_to_the_encoded_size():
    """On stain-like images (dark background, bright blobs, camera noise); the bench measures real ones."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :128]
    for seed in range(3):
        field = np.zeros((128, 128))
        for cy, cx, r in rng.uniform([0, 0, 5], [128, 128, 20], size=(6, 3)):
            field += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        px = np.clip(field + rng.normal(8, 3 + seed, field.shape), 0, 255).astype(np.uint8)
        ratio = stains.estimate_png_bytes(px) / len(stains.encode_png(px))
        assert 0.8 < ratio < 1.5, ratio


def test_inspect_matches_validate():
    data = _stains(size=16)
    seen = stains.inspect_stains(data, image_size=8)
    valid = stains.validate_stains(data, image_size=8)
    assert (seen.height, seen.width, seen.mean, seen.conversions) == (8, 8, valid.mean, valid.conversions)
    assert all(p.shape == (8, 8) for p in seen.pixels.values())
