import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.images import (ImageError, ImageSettings, image_size, load_image, resize_image, resize_size,
                                    VAE_RESIZE, vae_resize, VIT_RESIZE, vit_resize)
from services.common.tensor_codec import to_tensor


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data: a decompression-bomb stand-in."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ---- resize --------------------------------------------------------------------------------------

def test_worked_example_vae_then_vit():
    assert resize_size(96, 64, *VAE_RESIZE) == (768, 512)
    assert resize_size(768, 512, *VIT_RESIZE) == (770, 518)  # 55 x 37 patches = 2035 tokens
    img = vit_resize(vae_resize(_noise(96, 64)))
    assert img.size == (770, 518)
    assert (img.width // 14) * (img.height // 14) == 2035


@pytest.mark.parametrize("w,h,limits,expected", [
    # scale = max(min(1024/1000, 1), 512/10) = 51.2 -> (51200, 512); area over the cap ->
    # scale = 1806336/26214400 -> (round(3528)->3520, round(35.28)->32); long side over 1024 ->
    # scale = 1024/3520 -> (1024, round(9.3)=9 -> at least one stride = 16).
    (1000, 10, VAE_RESIZE, (1024, 16)),
    (10, 1000, VAE_RESIZE, (16, 1024)),
    # ViT: scale 22.4 -> (22400, 224); area cap 0.36 -> (8064, round(80.64)=81 -> 84); 980/8064 -> (980, 14).
    (1000, 10, VIT_RESIZE, (980, 14)),
    # scale = 1024/4000 = 0.256 -> (1024, 768), under both caps.
    (4000, 3000, VAE_RESIZE, (1024, 768)),
    # scale = 980/4000 = 0.245 -> (980, round(735/14)=52 (half to even) * 14 = 728).
    (4000, 3000, VIT_RESIZE, (980, 728)),
    # scale = 512/17 -> (512, round(933.65)=934 -> 58*16 = 928).
    (17, 31, VAE_RESIZE, (512, 928)),
    # scale = 224/17 -> (224, round(408.47)=408 -> 29*14 = 406).
    (17, 31, VIT_RESIZE, (224, 406)),
    (1, 1, VAE_RESIZE, (512, 512)),
])
def test_resize_size_by_hand(w, h, limits, expected):
    assert resize_size(w, h, *limits) == expected


@pytest.mark.parametrize("w,h", [(1000, 10), (10, 1000), (4000, 3000), (17, 31), (3, 5000), (640, 480),
                                 (1023, 1025), (5000, 5000)])
@pytest.mark.parametrize("limits", [VAE_RESIZE, VIT_RESIZE])
def test_resize_size_respects_stride_and_limits(w, h, limits):
    max_size, _, stride = limits
    nw, nh = resize_size(w, h, *limits)
    assert nw % stride == 0 and nh % stride == 0
    assert stride <= nw <= max_size and stride <= nh <= max_size
    assert nw * nh <= 14 * 14 * 9 * 1024


def test_resize_image_sizes():
    img = _noise(768, 512)
    assert vae_resize(img) is img  # already the target size: untouched
    out = resize_image(_noise(17, 31), *VIT_RESIZE)
    assert out.size == (224, 406) and out.mode == "RGB"


# ---- decoding ------------------------------------------------------------------------------------

def test_load_png_bytes_and_path(tmp_path):
    src = _noise(20, 10)
    data = _png(src)
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(src))
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for arg in (path, str(path)):
        img = load_image(arg)
        assert img.size == (20, 10) and img.mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"not an image at all", np.random.default_rng(0).bytes(4096)])
def test_garbage_is_refused(data):
    with pytest.raises(ImageError) as info:
        load_image(data)
    assert "0x" not in str(info.value)  # PIL's own message shows the BytesIO's heap address


def test_unreadable_image_message_names_the_formats():
    with pytest.raises(ImageError, match=r"cannot decode image: not a readable image \(PNG, JPEG"):
        load_image(b"not an image at all")


def test_truncated_png_is_refused():
    data = _png(_noise(64, 64))
    with pytest.raises(ImageError, match="decode"):
        load_image(data[: len(data) // 2])


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")


def test_zero_size_header_is_refused():
    with pytest.raises(ImageError):
        load_image(_png_header_only(0, 0))


def test_pixel_limits():
    # The header alone is enough: no pixel is decoded (there are none).
    with pytest.raises(ImageError, match="pixels"):
        load_image(_png_header_only(20000, 20000))  # 400 Mpx, over our limit and PIL's
    with pytest.raises(ImageError, match="too large"):
        # Between PIL's warning and error thresholds, with our own limit lifted: PIL's warning counts too.
        load_image(_png_header_only(10000, 10000), max_pixels=10**9)
    data = _png(_noise(100, 100))
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="pixels"):
        load_image(data, max_pixels=9_999)


def test_byte_limit(tmp_path):
    data = _png(_noise(32, 32))
    assert load_image(data, max_bytes=len(data)).size == (32, 32)
    with pytest.raises(ImageError, match="bytes"):
        load_image(data, max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="bytes"):
        load_image(path, max_bytes=100)


def test_formats_outside_the_allow_list_are_refused():
    buf = io.BytesIO()
    _noise(8, 8).save(buf, "PPM")
    with pytest.raises(ImageError):
        load_image(buf.getvalue())


# ---- modes ---------------------------------------------------------------------------------------

def test_rgba_is_laid_over_white():
    a = np.zeros((1, 2, 4), dtype=np.uint8)
    a[0, 0] = (10, 20, 30, 255)  # opaque: kept
    a[0, 1] = (10, 20, 30, 0)  # transparent: white
    img = load_image(_png(Image.fromarray(a, "RGBA")))
    assert img.mode == "RGB"
    assert np.asarray(img).tolist() == [[[10, 20, 30], [255, 255, 255]]]


def test_grayscale_palette_and_16bit_become_rgb():
    gray = load_image(_png(Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), "L")))
    assert gray.mode == "RGB" and np.asarray(gray)[0].tolist() == [[0] * 3, [100] * 3, [255] * 3]

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    out = load_image(_png(pal))
    assert out.mode == "RGB" and np.asarray(out)[0].tolist() == [[255, 0, 0], [0, 0, 255]]

    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    out = load_image(_png(deep))
    # Scaled from 16 to 8 bits (PIL's plain convert would clip everything above 255 to white).
    assert out.mode == "RGB" and np.asarray(out)[0, :, 0].tolist() == [0, 128, 255]


# ---- tensors and generation sizes ----------------------------------------------------------------

def test_to_tensor_range_and_layout():
    a = np.array([[[0, 128, 255], [255, 0, 0]]], dtype=np.uint8)  # 1 x 2 pixels
    x = to_tensor(Image.fromarray(a, "RGB"))
    assert x.dtype == torch.float32 and x.shape == (3, 1, 2)
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 128 / 255 * 2 - 1, 1.0], abs=1e-6)
    assert x[:, 0, 1].tolist() == [1.0, -1.0, -1.0]
    assert x.min() >= -1 and x.max() <= 1


def _with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_only_when_asked():
    src = Image.new("RGB", (40, 20), (255, 255, 255))
    src.paste((255, 0, 0), (0, 0, 10, 10))  # a red mark in the top-left corner
    data = _with_orientation(src, 6)  # 6: the viewer turns it 90 degrees clockwise
    plain = load_image(data)
    assert plain.size == (40, 20) and plain.getpixel((2, 2))[0] > 200 > plain.getpixel((2, 2))[1]
    upright = load_image(data, exif_transpose=True)
    assert upright.size == (20, 40)
    assert upright.getpixel((17, 2))[0] > 200 > upright.getpixel((17, 2))[1]  # the mark is now top-right
    assert min(upright.getpixel((2, 2))) > 200  # and top-left is white
    assert image_size(data) == (40, 20) and image_size(data, exif_transpose=True) == (20, 40)
    assert image_size(_with_orientation(src, 3), exif_transpose=True) == (40, 20)  # 180 degrees: sides kept


def test_exif_transpose_setting(monkeypatch):
    assert not ImageSettings.from_env().exif_transpose  # off by default, as the reference
    monkeypatch.setenv("BAGEL_EXIF_TRANSPOSE", "1")
    assert ImageSettings.from_env().exif_transpose
