"""Image input rules: safe decoding, the official BAGEL resize, normalisation, generation sizes.

The resize and normalisation reproduce the official preprocessing (`MaxLongEdgeMinShortEdgeResize`
plus ToTensor/Normalize(0.5, 0.5)) so that token counts and pixel values match it exactly.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.contracts import InputError
from services.common.settings import EnvSettings, setting

# Default limits for untrusted input. 32 MiB covers any reasonable photo in a compressed format;
# 64 megapixels (about 192 MiB once decoded to RGB) is far above the largest size the models use
# (1024 px for the VAE, 980 px for the ViT) but bounds memory against decompression bombs.
# PIL's own bomb guard (Image.MAX_IMAGE_PIXELS, ~89 Mpx) also applies and is reported the same way.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# Formats PIL may decode. Anything else (EPS, which runs Ghostscript, and the rarer plugins) is refused.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# (max_size, min_size, stride) of the official transforms; both use DEFAULT_MAX_PIXELS.
VAE_RESIZE = (1024, 512, 16)
VIT_RESIZE = (980, 224, 14)
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


# EXIF orientation tag values that turn the stored pixels by 90 or 270 degrees (width and height swap).
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)


class ImageError(InputError):
    """Bad image input: unreadable, too large, or an invalid size."""


@dataclass(frozen=True)
class ImageSettings(EnvSettings):
    """How every process that decodes or sizes input images reads them; the gateway and the ViT and VAE
    servers must agree, or an edit's planned size and its latent differ."""
    # Turn images upright per their EXIF Orientation tag (phone photos). Off: the reference ignores the tag.
    exif_transpose: bool = setting("BAGEL_EXIF_TRANSPOSE", False)


def load_image(data: bytes | str | Path, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS, exif_transpose: bool = False) -> Image.Image:
    """Decode encoded image bytes, or a file path, into an RGB PIL image; exif_transpose: turned upright
    per its EXIF Orientation tag (off by default, as the reference preprocessing ignores it)."""
    with _image_errors():
        img = _open(_read(data, max_bytes), max_pixels)
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def image_size(data: bytes | str | Path, max_bytes: int = MAX_IMAGE_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS, exif_transpose: bool = False) -> tuple[int, int]:
    """(width, height) from the header alone, refused exactly as load_image would refuse the file's bytes,
    format and size; no pixel is decoded (what the gateway needs to plan a job). exif_transpose: the size
    load_image(..., exif_transpose=True) gives."""
    with _image_errors():
        img = _open(_read(data, max_bytes), max_pixels)
        w, h = img.size
        if exif_transpose and img.getexif().get(_EXIF_ORIENTATION) in _SWAPS_SIDES:
            return h, w
        return w, h


def _read(data: bytes | str | Path, max_bytes: int) -> bytes:
    if isinstance(data, (str, Path)):
        path = Path(data)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageError(f"image file {path} is {size} bytes; the limit is {max_bytes}")
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read image file {path}: {e}") from e
    data = bytes(data)
    if not data:
        raise ImageError("image data is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image data is {len(data)} bytes; the limit is {max_bytes}")
    return data


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image opened lazily (PIL reads only the header), its format and size checked."""
    img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    return img


@contextmanager
def _image_errors() -> Iterator[None]:
    """PIL's failures as ImageError."""
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than fails) between its limit and twice it: treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        # PIL's own message names the BytesIO we wrapped the data in, heap address included: not for clients.
        raise ImageError(f"cannot decode image: not a readable image ({', '.join(ALLOWED_FORMATS)})") from e
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, zlib.error, ...)
        raise ImageError(f"cannot decode image: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    # 16/32-bit grayscale: PIL's own conversion clips at 255 (a white image); scale 16-bit down instead.
    if img.mode.startswith("I"):
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
    # The official rule: anything with an alpha channel or a transparency key is laid over white.
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def resize_size(width: int, height: int, max_size: int, min_size: int, stride: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(new_w, new_h) exactly as the official MaxLongEdgeMinShortEdgeResize computes it."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    nw, nh = _apply_scale(width, height, scale, stride)
    if nw * nh > max_pixels:
        # The official code scales by the area ratio (not its square root): kept for identical sizes.
        scale = max_pixels / (nw * nh)
        nw, nh = _apply_scale(nw, nh, scale, stride)
    if max(nw, nh) > max_size:
        scale = max_size / max(nw, nh)
        nw, nh = _apply_scale(nw, nh, scale, stride)
    return nw, nh


def resize_image(img: Image.Image, max_size: int, min_size: int, stride: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    size = resize_size(img.width, img.height, max_size, min_size, stride, max_pixels)
    if size == img.size:
        return img
    # PIL's bicubic filter always antialiases, like the official torchvision resize on PIL images.
    return img.resize(size, Image.BICUBIC)


def vae_resize(img: Image.Image) -> Image.Image:
    return resize_image(img, *VAE_RESIZE)


def vit_resize(img: Image.Image) -> Image.Image:
    return resize_image(img, *VIT_RESIZE)


def vae_size(width: int, height: int) -> tuple[int, int]:
    """The size vae_resize gives an image of this size, without its pixels."""
    return resize_size(width, height, *VAE_RESIZE)


def vit_size(width: int, height: int) -> tuple[int, int]:
    return resize_size(width, height, *VIT_RESIZE)
