"""Safe image loading: file path, bytes or PIL image in, an RGB uint8 PIL image out.

Untrusted images are the front door of a VLM server, so this loader:
decodes only an allowlist of formats (Pillow's per-format parsers are a recurring CVE source); refuses
images over a pixel cap from the header alone, before any pixel decode, and turns Pillow's own
decompression-bomb warning into an error without touching global Pillow state; never accepts truncated
files; takes frame 0 of animations; applies the EXIF orientation; and maps every mode (alpha, palette,
CMYK, 16/32-bit, float, bilevel) to RGB, compositing transparency onto white. Every failure is an
``ImageLoadError`` naming the source and what to do about it.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ALLOWED_FORMATS", "ImageLoadError", "check_image_size", "load_image"]

# Sized for the model: the largest canvas the tiler ever builds is MAX_TILES_LIMIT (40) tiles of 448² ≈ 8.0 M
# pixels, so pixels beyond a few times that only cost memory (decoding takes ~19 bytes a pixel at peak: an
# 8000×8000 PNG of 242 KB needed 1.2 GB). 25 M pixels (5000×5000, ~0.5 GB peak) keeps 4K frames and 24-MP photos.
DEFAULT_MAX_PIXELS = 25_000_000  # refuse larger images before decoding
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the source and the fix."""


def _sniff_format(prefix: bytes) -> str | None:
    """Name of a known but disallowed format whose magic bytes match ``prefix`` (no parsing at all)."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if fmt in ALLOWED_FORMATS or accept is None:
            continue
        try:
            hit = accept(prefix)
        except Exception:  # a plugin's magic-byte check must never mask the real error
            continue
        if hit and not isinstance(hit, str):
            return fmt
    return None


def _scaled_to_l(a: np.ndarray, divisor: float | None) -> Image.Image:
    """Map a 1-channel array to an 8-bit "L" image: ``a / divisor`` if given, else min-max to 0..255.
    Non-finite values (NaN/inf in "F" images) become the low end."""
    a = a.astype(np.float64)
    fin = np.isfinite(a)
    lo, hi = (float(a[fin].min()), float(a[fin].max())) if fin.any() else (0.0, 0.0)
    a = np.where(fin, a, lo if divisor is None else 0.0)
    if divisor is None:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:
        a = a / divisor
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16"):
        # 16-bit samples: 65535 -> 255 (divide by 257), a rescale rather than Pillow's clip at 255.
        return _scaled_to_l(np.asarray(im), 257.0).convert("RGB")
    if mode == "I":
        # 32-bit container: scale by the smallest unsigned depth (8/16/32-bit) holding the data, since a
        # mode-"I" image often carries 16-bit samples; negative data has no such depth: min-max instead.
        a = np.asarray(im)
        lo, hi = int(a.min()), int(a.max())
        div = None if lo < 0 else 1.0 if hi <= 255 else 257.0 if hi <= 65535 else (2**31 - 1) / 255
        return _scaled_to_l(a, div).convert("RGB")
    if mode == "F":
        # Floats: [0, 1] -> x255, [0, 255] kept, anything else min-max scaled.
        a = np.asarray(im)
        fin = a[np.isfinite(a)]
        flo, fhi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 0.0)
        div = None if flo < 0 or fhi > 255 else (1 / 255 if fhi <= 1 else 1.0)
        return _scaled_to_l(a, div).convert("RGB")
    try:
        if mode in _ALPHA_MODES or "transparency" in im.info:
            # Transparent pixels would otherwise turn black (or show garbage colour): composite on white.
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(f"{name}: image mode {mode!r} cannot be converted to RGB ({e})") from e


def check_image_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> None:
    """ImageLoadError unless ``1 <= width*height <= max_pixels`` (call it on header sizes, before decoding)."""
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name}: image has an empty dimension ({width}x{height}); not a usable image")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, over the cap max_pixels={max_pixels:,}; "
            "refused before decoding. Downscale it, or raise tiling.max_pixels (load_image's max_pixels) if trusted."
        )


def _finish(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    check_image_size(*im.size, max_pixels, name)
    im.load()  # decode frame 0 only (the current frame after open); raises on truncation
    try:
        im = ImageOps.exif_transpose(im)  # returns a new image; never edits the caller's
    except Exception:  # malformed EXIF: keep the pixels as stored rather than reject the image
        pass
    out = _to_rgb(im, name)
    return out if out.mode == "RGB" else out.convert("RGB")


# Long on purpose: the safety checks in the order they must run (the pixel cap before any decode).
def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``source`` as an RGB uint8 image; raise ``ImageLoadError`` on anything unsafe or unreadable."""
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    fp: io.BytesIO | str | None  # what Image.open reads: the bytes, or the file's path
    if isinstance(source, Image.Image):
        name, fp, prefix = "<PIL image>", None, b""
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name, fp, prefix = "<bytes>", io.BytesIO(data), data[:16]
        if not data:
            raise ImageLoadError("<bytes>: empty input (0 bytes); not a readable image")
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        name = name if isinstance(name, str) else os.fsdecode(name)
        try:
            mode = os.stat(name).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO or device (/dev/zero) blocks or never ends
                raise ImageLoadError(f"{name}: not a regular file (a device or FIFO); give an image file")
            with open(name, "rb") as f:
                prefix = f.read(16)
        except FileNotFoundError as e:
            raise ImageLoadError(f"{name}: file not found; check the path") from e
        except OSError as e:
            raise ImageLoadError(f"{name}: cannot read file ({e.strerror or e})") from e
        if not prefix:
            raise ImageLoadError(f"{name}: empty file (0 bytes); not a readable image")
        fp = name
    else:
        raise TypeError(f"source must be a path, bytes or PIL.Image.Image, got {type(source).__name__}")

    with warnings.catch_warnings():
        # Local only: Pillow's bomb *warning* (over Image.MAX_IMAGE_PIXELS) becomes an exception here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if fp is None:
                assert isinstance(source, Image.Image)  # the one source without a file to open
                return _finish(source, name, max_pixels)
            with Image.open(fp, formats=ALLOWED_FORMATS) as im:  # header only; pixels stay undecoded
                return _finish(im, name, max_pixels)
        except ImageLoadError:
            raise
        except UnidentifiedImageError as e:
            fmt = _sniff_format(prefix)
            why = (
                f"format {fmt} not allowed (allowed: {', '.join(ALLOWED_FORMATS)}); convert it to PNG or JPEG"
                if fmt
                else f"not a readable image (not one of {', '.join(ALLOWED_FORMATS)}); check the file's contents"
            )
            raise ImageLoadError(f"{name}: {why}") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(
                f"{name}: refused as a possible decompression bomb ({e}). This loader's cap is "
                f"max_pixels={max_pixels:,} and Pillow's limit Image.MAX_IMAGE_PIXELS="
                f"{Image.MAX_IMAGE_PIXELS:,} also applies; downscale the image first."
            ) from e
        except MemoryError:
            raise
        except Exception as e:  # any decoder failure on untrusted bytes must surface as one error type
            what = "truncated" if "truncated" in str(e) else "corrupt or undecodable"
            raise ImageLoadError(
                f"{name}: image data is {what} ({type(e).__name__}: {e}); re-export or re-download the file"
            ) from e
