"""Tests for nvlm.vision.image_io.load_image: bad inputs, bombs, modes, EXIF, animation. All fixtures are
generated here with Pillow/bytes."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from nvlm.vision.image_io import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageLoadError, load_image


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed-looking RGB PNG whose IHDR claims ``width`` x ``height``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _px(img: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(np.asarray(img)[xy[1], xy[0]].tolist())


def _assert_rgb8(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB" and img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


# --- bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path: Path, fmt, ext):
    data = _encode(_noise(200, 200), fmt)
    p = tmp_path / f"cut.{ext}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as ei:
        load_image(p)
    assert str(p) in str(ei.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_byte_file(tmp_path: Path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="0 bytes") as ei:
        load_image(p)
    assert str(p) in str(ei.value)
    with pytest.raises(ImageLoadError, match="<bytes>.*0 bytes"):
        load_image(b"")


@pytest.mark.parametrize(
    "payload",
    [b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", np.random.default_rng(7).bytes(4096)],
    ids=["html", "random"],
)
def test_not_an_image(tmp_path: Path, payload: bytes):
    p = tmp_path / "fake.png"
    p.write_bytes(payload)
    with pytest.raises(ImageLoadError, match="not a readable image") as ei:
        load_image(p)
    assert str(p) in str(ei.value)
    with pytest.raises(ImageLoadError, match="^<bytes>: not a readable image"):
        load_image(payload)


def test_tiff_not_allowed(tmp_path: Path):
    p = tmp_path / "scan.tiff"
    p.write_bytes(_encode(_noise(8, 8), "TIFF"))
    with pytest.raises(ImageLoadError, match="format TIFF not allowed") as ei:
        load_image(p)
    assert str(p) in str(ei.value)
    # Allowlist is enforced by content, not by name.
    p2 = tmp_path / "looks_fine.png"
    p2.write_bytes(p.read_bytes())
    with pytest.raises(ImageLoadError, match="TIFF not allowed"):
        load_image(p2)


def test_missing_path_and_directory(tmp_path: Path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="not found") as ei:
        load_image(p)
    assert str(p) in str(ei.value)
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(b"x", max_pixels=0)
    with pytest.raises(TypeError, match="source"):
        load_image(12345)  # type: ignore[arg-type]


# --- size caps and bombs ----------------------------------------------------------------------------------


def test_over_cap_small_png(tmp_path: Path):
    p = tmp_path / "small.png"
    _noise(100, 100).save(p)
    with pytest.raises(ImageLoadError) as ei:
        load_image(p, max_pixels=9_999)
    msg = str(ei.value)
    assert str(p) in msg and "100x100" in msg and "9,999" in msg and "max_pixels" in msg
    assert load_image(p, max_pixels=10_000).size == (100, 100)  # exactly at the cap is fine


def test_header_declared_bomb_refused_without_decoding(tmp_path: Path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_declaring(100_000, 100_000))
    assert p.stat().st_size < 200
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadError) as ei:
            load_image(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(ei.value)
    assert str(p) in msg and f"{DEFAULT_MAX_PIXELS:,}" in msg
    assert peak < 50 * 2**20


def test_header_over_our_cap_but_under_pillows(tmp_path: Path):
    # 81 MP: below Pillow's own warning limit, above our 25 MP cap -> our header check must refuse it. Had
    # the pixels been decoded, the tiny IDAT would have produced a "truncated" error instead.
    p = tmp_path / "big.png"
    p.write_bytes(_png_declaring(9000, 9000))
    with pytest.raises(ImageLoadError, match="over the cap") as ei:
        load_image(p)
    assert "9000x9000" in str(ei.value) and f"{DEFAULT_MAX_PIXELS:,}" in str(ei.value) and str(p) in str(ei.value)


def test_pillow_bomb_warning_becomes_error_locally():
    data = _png_declaring(10_000, 10_000)  # 100 MP: Pillow warns (> MAX_IMAGE_PIXELS), does not raise
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ImageLoadError, match="decompression bomb") as ei:
            load_image(data, max_pixels=10**9)
    assert "<bytes>" in str(ei.value) and "1,000,000,000" in str(ei.value)
    assert not [w for w in rec if issubclass(w.category, Image.DecompressionBombWarning)]
    assert list(warnings.filters) == filters_before


def test_pil_input_over_cap():
    with pytest.raises(ImageLoadError, match="<PIL image>.*over the cap"):
        load_image(Image.new("RGB", (50, 50)), max_pixels=2_499)


# --- accepted formats, inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_allowed_formats_roundtrip(tmp_path: Path, fmt):
    src = Image.new("RGB", (12, 9), (200, 40, 90))
    p = tmp_path / f"ok.{fmt.lower()}"
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    src.save(p, fmt, **kw)
    arr = _assert_rgb8(load_image(p), (12, 9))
    assert np.abs(arr.astype(int) - [200, 40, 90]).max() <= (4 if fmt in ("JPEG", "GIF") else 0)


def test_bytes_and_str_path_inputs(tmp_path: Path):
    src = _noise(17, 11, seed=3)
    data = _encode(src, "PNG")
    p = tmp_path / "a.png"
    p.write_bytes(data)
    for source in (data, bytearray(data), str(p), p):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(src))


def test_pil_input_not_mutated():
    src = Image.new("RGBA", (6, 4), (10, 20, 30, 0))
    src.putpixel((1, 1), (200, 100, 50, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    src.info["exif"] = exif.tobytes()
    before = (src.mode, src.size, src.tobytes(), dict(src.info))
    out = load_image(src)
    assert (src.mode, src.size, src.tobytes(), dict(src.info)) == before
    assert out is not src and out.mode == "RGB" and out.size == (4, 6)  # rotated per EXIF, alpha gone


def test_lazy_pil_input(tmp_path: Path):
    p = tmp_path / "lazy.png"
    Image.new("L", (5, 5), 9).save(p)
    with Image.open(p) as lazy:
        assert _px(load_image(lazy)) == (9, 9, 9)


# --- modes --------------------------------------------------------------------------------------------------


def test_rgba_composited_on_white(tmp_path: Path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((3, 3), (255, 0, 0, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    p = tmp_path / "rgba.png"
    img.save(p)
    out = load_image(p)
    _assert_rgb8(out, (4, 4))
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (3, 3)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in _px(out, (2, 2)))  # half black over white


def test_la_composited_on_white():
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (60, 255))
    out = load_image(img)
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (60, 60, 60)


@pytest.mark.parametrize("mode", ["P", "PA"])
def test_palette_with_transparency(tmp_path: Path, mode):
    pal = Image.new("P", (3, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    pal.putpixel((1, 0), 1)
    pal.putpixel((2, 0), 2)
    if mode == "P":
        pal.info["transparency"] = 0
        p = tmp_path / "p.png"
        pal.save(p)
        out = load_image(p)
    else:
        img = pal.convert("PA")
        img.putpixel((0, 0), (0, 0))  # index 0 (black), alpha 0
        assert img.mode == "PA"
        out = load_image(img)
    assert [_px(out, (x, 0)) for x in range(3)] == [(255, 255, 255), (255, 0, 0), (0, 0, 255)]


def test_palette_without_transparency(tmp_path: Path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 12, 34, 56])
    pal.putpixel((1, 0), 1)
    out = load_image(pal)
    assert _px(out, (0, 0)) == (0, 0, 0) and _px(out, (1, 0)) == (12, 34, 56)


def test_cmyk():
    img = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 255, 255, 0))
    out = load_image(img)
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (255, 0, 0)


def test_cmyk_jpeg_file(tmp_path: Path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)
    arr = _assert_rgb8(load_image(p), (16, 16))
    assert np.abs(arr.astype(int) - [255, 0, 0]).max() <= 8


def test_i16_scaled_not_clipped(tmp_path: Path):
    a = np.array([[65535, 32768, 0, 257, 1000]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode == "I;16"
    out = load_image(p)
    assert [_px(out, (x, 0)) for x in range(5)] == [(255,) * 3, (128,) * 3, (0,) * 3, (1,) * 3, (4,) * 3]
    big_endian = Image.frombytes("I;16B", (2, 1), b"\xff\xff\x80\x00")
    out = load_image(big_endian)
    assert [_px(out, (x, 0))[0] for x in range(2)] == [255, 128]


def test_mode_i_and_f_scaling():
    as16 = Image.fromarray(np.array([[65535, 32768]], dtype=np.int32))
    assert as16.mode == "I"
    assert [_px(load_image(as16), (x, 0))[0] for x in range(2)] == [255, 128]
    as8 = Image.fromarray(np.array([[200, 3]], dtype=np.int32))
    assert [_px(load_image(as8), (x, 0))[0] for x in range(2)] == [200, 3]
    signed = Image.fromarray(np.array([[-255, 0, 255]], dtype=np.int32))
    assert [_px(load_image(signed), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert [_px(load_image(unit), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 1.0, 0.0, np.nan]], dtype=np.float32))
    assert [_px(load_image(wide), (x, 0))[0] for x in range(4)] == [0, 255, 128, 0]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert [_px(load_image(byte_range), (x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_bilevel_and_grey(tmp_path: Path):
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    p = tmp_path / "bw.png"
    bw.save(p)
    out = load_image(p)
    assert _px(out, (0, 0)) == (0, 0, 0) and _px(out, (1, 0)) == (255, 255, 255)
    grey = tmp_path / "grey.png"
    Image.new("L", (3, 3), 77).save(grey)
    assert (_assert_rgb8(load_image(grey), (3, 3)) == 77).all()


# --- EXIF orientation, animation -------------------------------------------------------------------------


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])  # np.rot90 k: +1 = 90 deg CCW
def test_exif_orientation(tmp_path: Path, orientation, k):
    src = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(3, 4, 3) * 7  # 4 wide, 3 high, all pixels distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.png"
    Image.fromarray(src).save(p, exif=exif)
    out = np.asarray(load_image(p))
    assert out.shape[:2] == ((4, 3) if orientation in (6, 8) else (3, 4))
    assert np.array_equal(out, np.rot90(src, k=k))


def test_exif_orientation_jpeg_swaps_size(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "cam.jpg"
    Image.new("RGB", (40, 20), (0, 128, 0)).save(p, exif=exif)
    assert load_image(p).size == (20, 40)


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_first_frame_only(tmp_path: Path, fmt, kw):
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    p = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(p, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    with Image.open(p) as check:
        assert getattr(check, "n_frames", 1) == 3
    arr = _assert_rgb8(load_image(p), (8, 6))
    assert (arr == np.array([255, 0, 0], dtype=np.uint8)).all()


def test_ceilings_sized_for_the_model_and_devices_refused(tmp_path: Path):
    """8000x8000 (a 242 KB PNG cost 1.2 GB to decode) is over the default cap; max_tiles has a ceiling (20000
    took minutes); a device or FIFO is refused before it is opened (it would never end, or block forever)."""
    import os

    from nvlm.config import ConfigError, NVLMConfig, TilingConfig
    from nvlm.vision.tiling import MAX_TILES_LIMIT, check_tile_counts, plan_tiles

    assert 8000 * 8000 > DEFAULT_MAX_PIXELS >= 6000 * 4000  # a 24-MP photo still loads
    with pytest.raises(ImageLoadError, match="8000x8000 .* over the cap"):
        load_image(_png_declaring(8000, 8000))
    assert TilingConfig().max_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match=f"max_tiles must be at most {MAX_TILES_LIMIT}"):
        plan_tiles(1000, 1000, 448, 1, 20000)
    assert check_tile_counts(1, MAX_TILES_LIMIT) == (1, MAX_TILES_LIMIT)
    with pytest.raises(ConfigError, match=f"max_tiles must be between 1 and {MAX_TILES_LIMIT}"):
        NVLMConfig(tiling=TilingConfig(max_tiles=MAX_TILES_LIMIT + 1)).validate()
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image("/dev/zero")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
