"""Every image a user may hand over either loads as upright 8-bit RGB or fails with an InputError naming the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from savpack_runtime.errors import InputError
from savpack_runtime.images import check_image, load_image


def save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def test_rgb_passes_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (7, 5, 3), dtype=np.uint8)
    image = load_image(save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


def test_grayscale_cmyk_and_palette(tmp_path):
    grey = load_image(save(Image.new("L", (4, 3), 77), tmp_path / "g.png"))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]
    cmyk = load_image(save(Image.new("CMYK", (4, 3), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    red, green, blue = np.asarray(cmyk)[1, 1].tolist()
    assert cmyk.mode == "RGB" and red > 200 and green < 60 and blue < 60
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(load_image(save(palette, tmp_path / "p.png")))[0, 0].tolist() == [10, 200, 30]


def test_transparency_is_laid_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    assert np.asarray(load_image(save(rgba, tmp_path / "t.png"))).tolist() == [[[255, 255, 255], [255, 0, 0]]]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(save(palette, tmp_path / "pt.png", transparency=0))).tolist() == [[[255, 255, 255], [0, 0, 255]]]


def test_sixteen_bit_grey_is_scaled(tmp_path):
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    image = load_image(save(Image.fromarray(values), tmp_path / "16.png"))
    assert np.asarray(image)[..., 0].tolist() == [[0, 255], [128, 4]]


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:8, :8] = [255, 0, 0]  # red top-left corner of a 48 wide x 32 high picture
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    path = save(Image.fromarray(pixels), tmp_path / "r.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (32, 48)  # upright: 32 wide x 48 high
    upright = np.asarray(image)
    assert upright[2, -3, 0] > 200 and upright[2, 2, 0] < 50  # the red corner moved to the top-right


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not an image file"), (b"this is not a picture", "not an image file")],
)
def test_empty_and_garbage_files(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"bad.png: {message}"):
        load_image(path)


def test_truncated_image(tmp_path):
    data = (tmp_path / "full.png")
    save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), data)
    cut = tmp_path / "cut.png"
    cut.write_bytes(data.read_bytes()[:300])
    check_image(cut)  # the header alone is intact
    with pytest.raises(InputError, match="cut.png: image is corrupt or truncated"):
        load_image(cut)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.jpg: image file does not exist"):
        load_image(tmp_path / "nope.jpg")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge size (a decompression bomb needs only a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(InputError, match="bomb.png: image (refused as a decompression bomb|declares 100000x100000)"):
        load_image(path)
    path.write_bytes(png_claiming(9000, 9000))  # below PIL's own bomb limit, above savpack's
    with pytest.raises(InputError, match="declares 9000x9000 pixels, more than the limit"):
        load_image(path)


def test_images_in_memory_refuse_oversize_as_image_size_errors(tmp_path):
    """ImageBytes (a Parquet cell, an upload to the service): the pixel limit is read from the header before decoding
    and refused as ImageSizeError (the service's 413), naming the given field."""
    import io

    from savpack_runtime.errors import ImageSizeError
    from savpack_runtime.images import ImageBytes

    buffer = io.BytesIO()
    Image.new("RGB", (2, 1)).save(buffer, format="PNG")
    upload = ImageBytes(buffer.getvalue(), "inputs[0].images[0]")
    assert check_image(upload) == (2, 1) and load_image(upload).size == (2, 1)
    with pytest.raises(ImageSizeError, match=r"^inputs\[0\]\.images\[0\]: image declares 2x1 pixels, more than the limit of 1$"):
        load_image(upload, max_pixels=1)
