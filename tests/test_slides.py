"""Tests for the lazy slide / label readers and validated image I/O."""

from __future__ import annotations

import gc
import os

import numpy as np
import psutil
import pytest
import tifffile
from PIL import Image

from diffusiondci.data import slides as slides_mod
from diffusiondci.data.imageio import IMAGE_SUFFIXES, read_mask, read_rgb, write_png_atomic
from diffusiondci.data.slides import open_label_image, open_slide, validate_labels
from diffusiondci.errors import UserInputError

H, W = 600, 700  # deliberately not multiples of the 256 px tile


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def crop_padded(array, x, y, w, h, fill):
    """Independent reference: pad the in-memory array generously, then crop."""
    pad = max(w, h) + abs(x) + abs(y)
    widths = ((pad, pad), (pad, pad)) + (((0, 0),) if array.ndim == 3 else ())
    padded = np.pad(array, widths, constant_values=fill)
    return padded[y + pad : y + pad + h, x + pad : x + pad + w]


WINDOWS = [
    (0, 0, 256, 256),
    (100, 37, 300, 211),
    (600, 500, 256, 256),  # extends past the right and bottom borders
    (-40, -10, 100, 90),  # starts before the top-left corner
    (650, -5, 80, 700),  # taller than the slide
    (800, 700, 10, 10),  # entirely outside
]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tile=(256, 256), compression="zlib"),
        dict(tile=(256, 256)),
        dict(),  # uncompressed single strip -> memory-mapped path
        dict(compression="zlib", rowsperstrip=50),
    ],
    ids=["tiled-zlib", "tiled-raw", "strip-raw", "strips-zlib"],
)
def test_tiff_regions_match_array(tmp_path, rgb, kwargs):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", **kwargs)
    with open_slide(path) as slide:
        assert (slide.height, slide.width) == (H, W)
        assert slide.path == path
        for x, y, w, h in WINDOWS:
            for fill in (0, 255):
                got = slide.read_region(x, y, w, h, fill=fill)
                assert got.dtype == np.uint8 and got.shape == (h, w, 3)
                np.testing.assert_array_equal(got, crop_padded(rgb, x, y, w, h, fill))


def test_planar_rgba_and_16bit_tiff(tmp_path, rgb):
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate", tile=(256, 256))
    rgba = tmp_path / "rgba.tif"
    alpha = np.full((H, W, 1), 9, np.uint8)
    tifffile.imwrite(rgba, np.concatenate([rgb, alpha], -1), photometric="rgb", tile=(256, 256))
    for path in (planar, rgba):
        with open_slide(path) as slide:
            np.testing.assert_array_equal(slide.read_region(100, 200, 300, 300), rgb[200:500, 100:400])

    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, rgb.astype(np.uint16) * 257, photometric="rgb", tile=(256, 256))
    with pytest.warns(UserWarning, match="16-bit"):
        slide = open_slide(deep)
    with slide:  # v * 257 / 257 == v exactly
        np.testing.assert_array_equal(slide.read_region(0, 0, W, H), rgb)
    big_endian = tmp_path / "deep_be.tif"  # uncompressed, contiguous -> memory-mapped
    tifffile.imwrite(big_endian, rgb.astype(">u2") * 257, photometric="rgb", byteorder=">")
    with pytest.warns(UserWarning, match="16-bit"), open_slide(big_endian) as slide:
        np.testing.assert_array_equal(slide.read_region(-3, 5, 50, 60, fill=1), crop_padded(rgb, -3, 5, 50, 60, 1))


def block_mean(array, f):
    """Reference area average with partial border blocks, one block at a time."""
    h, w = array.shape[:2]
    out = np.zeros((-(-h // f), -(-w // f), array.shape[2]))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = array[i * f : (i + 1) * f, j * f : (j + 1) * f].reshape(-1, 3).mean(0)
    return np.rint(out).astype(np.uint8)


def test_thumbnail_without_pyramid_is_chunked_area_average(tmp_path, rgb, monkeypatch):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", tile=(256, 256))
    monkeypatch.setattr(slides_mod, "_THUMB_BUDGET_BYTES", 40 * W * 3)  # bands of 40-ish rows
    with open_slide(path) as slide:
        thumb = slide.thumbnail(100)  # factor ceil(700 / 100) = 7 -> 86 x 100
        assert thumb.shape == (86, 100, 3) and thumb.dtype == np.uint8
        np.testing.assert_array_equal(thumb, block_mean(rgb, 7))
        assert max(slide.thumbnail(64).shape[:2]) <= 64
        np.testing.assert_array_equal(slide.thumbnail(5000), rgb)  # never upscaled


def test_pyramidal_tiff_thumbnail_uses_a_level(tmp_path, rgb):
    path = tmp_path / "pyramid.tif"
    level1 = np.full((H // 2, W // 2, 3), 77, np.uint8)  # marker: differs from level 0
    level1[:, :, 1] = np.arange(W // 2, dtype=np.uint8)[None, :] % 200
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, photometric="rgb", tile=(256, 256), subifds=1)
        tw.write(level1, photometric="rgb", tile=(256, 256), subfiletype=1)
    with open_slide(path) as slide:
        assert (slide.height, slide.width) == (H, W)
        np.testing.assert_array_equal(slide.read_region(0, 0, W, H), rgb)
        np.testing.assert_array_equal(slide.thumbnail(350), level1)
        np.testing.assert_array_equal(slide.thumbnail(70), block_mean(level1, 5))
        # a thumbnail larger than the level but smaller than the slide comes from level 0
        np.testing.assert_array_equal(slide.thumbnail(700), rgb)


def test_png_and_jpeg(tmp_path, rgb):
    png = tmp_path / "slide.png"
    Image.fromarray(rgb).save(png)
    with open_slide(png) as slide:
        for x, y, w, h in WINDOWS:
            np.testing.assert_array_equal(slide.read_region(x, y, w, h, fill=3), crop_padded(rgb, x, y, w, h, 3))
        np.testing.assert_array_equal(slide.thumbnail(100), block_mean(rgb, 7))

    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb, np.zeros((H, W, 1), np.uint8)], -1)).save(rgba)
    np.testing.assert_array_equal(read_rgb(rgba), rgb)

    jpg = tmp_path / "slide.jpg"
    smooth = np.repeat(np.repeat(rgb[::20, ::20], 20, 0), 20, 1)[:H, :W]
    Image.fromarray(smooth).save(jpg, quality=95, subsampling=0)
    with open_slide(jpg) as slide:
        assert (slide.height, slide.width) == (H, W)
        reference = np.asarray(Image.open(jpg).convert("RGB"))
        np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40), reference[20:60, 10:40])
        assert np.abs(slide.read_region(0, 0, W, H).astype(int) - smooth).mean() < 3


# ----------------------------------------------------------------------------------- errors


def test_truncated_and_unreadable_files(tmp_path, rgb):
    tif = tmp_path / "full.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb", tile=(256, 256), compression="zlib")
    data = tif.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="cannot read image.*re-export") as info:
        with open_slide(cut) as slide:
            slide.read_region(0, 0, W, H)
    assert "cut.tif" in str(info.value)

    png = tmp_path / "full.png"
    Image.fromarray(rgb).save(png)
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(png.read_bytes()[:-5000])
    with pytest.raises(UserInputError, match="cut.png.*cannot read image"):
        open_slide(cut_png)

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UserInputError, match="notes.png.*cannot read image"):
        open_slide(text)
    with pytest.raises(UserInputError, match="not found"):
        open_slide(tmp_path / "missing.tif")


def test_non_rgb_slides_rejected(tmp_path, rgb):
    grey_tif = tmp_path / "grey.tif"
    tifffile.imwrite(grey_tif, rgb[..., 0])
    grey_png = tmp_path / "grey.png"
    Image.fromarray(rgb[..., 0]).save(grey_png)
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, rgb[..., :2], planarconfig="contig", photometric="minisblack")
    for path in (grey_tif, grey_png, two):
        with pytest.raises(UserInputError, match="not an RGB slide.*convert to RGB"):
            open_slide(path)


def test_pixel_limit(tmp_path, rgb):
    tif = tmp_path / "big.tif"
    tifffile.imwrite(tif, rgb, photometric="rgb", tile=(256, 256))
    png = tmp_path / "big.png"
    Image.fromarray(rgb).save(png)
    for path in (tif, png):
        with pytest.raises(UserInputError, match="--max-pixels") as info:
            open_slide(path, max_pixels=H * W - 1)
        assert "700x600" in str(info.value)
        with open_slide(path, max_pixels=H * W) as slide:  # exactly at the limit is fine
            assert slide.width == W
    # far above the limit: Pillow's own DecompressionBombError becomes a UserInputError
    with pytest.raises(UserInputError, match="--max-pixels"):
        open_slide(png, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS != 1000  # the global is restored


# ----------------------------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(1)
    return rng.integers(0, 3, (H, W), dtype=np.uint8)


def test_label_image_regions(tmp_path, labels):
    tif = tmp_path / "mask.tif"
    tifffile.imwrite(tif, labels, tile=(256, 256), compression="zlib")
    png = tmp_path / "mask.png"
    Image.fromarray(labels).save(png)
    rgb_png = tmp_path / "mask_rgb.png"
    Image.fromarray(np.repeat(labels[..., None], 3, -1)).save(rgb_png)
    for path in (tif, png, rgb_png):
        with open_label_image(path, H, W) as mask:
            for x, y, w, h in WINDOWS:
                got = mask.read_region(x, y, w, h)
                assert got.dtype == np.uint8 and got.shape == (h, w)
                np.testing.assert_array_equal(got, crop_padded(labels, x, y, w, h, 0))
        np.testing.assert_array_equal(read_mask(path, expected_hw=(H, W)), labels)


def test_label_errors(tmp_path, labels):
    bad = labels.copy()
    bad[500:510, 600:610] = 7
    bad[0, 699] = 255
    tif = tmp_path / "bad.tif"
    tifffile.imwrite(tif, bad, tile=(256, 256))
    with open_label_image(tif, H, W) as mask:
        np.testing.assert_array_equal(mask.read_region(0, 0, 256, 256), labels[:256, :256])  # clean region
        with pytest.raises(UserInputError, match=r"bad.tif.*7, 255.*0 background, 1 benign, 2 malignant"):
            mask.read_region(0, 0, W, H)
    with pytest.raises(UserInputError, match="values 7"):
        read_mask(tif)

    png = tmp_path / "labels.png"
    Image.fromarray(labels).save(png)
    with pytest.raises(UserInputError, match=r"labels.png.*600x700.*601x700") as info:
        open_label_image(png, H + 1, W)
    with pytest.raises(UserInputError, match="600x700.*600x701"):
        read_mask(png, expected_hw=(H, W + 1))
    assert info.value.path == png

    colour = tmp_path / "colour.png"
    Image.fromarray(np.stack([labels, labels, 2 - labels], -1)).save(colour)
    with pytest.raises(UserInputError, match="colour"):
        read_mask(colour)


def test_validate_labels():
    validate_labels(np.array([[0, 1], [2, 2]], np.int64))
    validate_labels(np.zeros((0, 3), np.uint8))
    for values in ([0, 3], [-1, 0], [0, 1.5]):
        with pytest.raises(UserInputError, match="mask"):
            validate_labels(np.array(values), "m.png")


# ----------------------------------------------------------------------------------- imageio


def test_write_png_atomic_roundtrip(tmp_path, rgb, labels):
    out = tmp_path / "sub" / "img.png"
    write_png_atomic(out, rgb)
    np.testing.assert_array_equal(read_rgb(out), rgb)
    write_png_atomic(out, rgb[::-1])  # overwrite in place
    np.testing.assert_array_equal(read_rgb(out), rgb[::-1])
    write_png_atomic(tmp_path / "mask.png", labels)
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), labels)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["img.png", "mask.png"]
    with pytest.raises(ValueError):
        write_png_atomic(tmp_path / "f.png", rgb.astype(np.float32))
    assert not (tmp_path / "f.png").exists()
    assert ".png" in IMAGE_SUFFIXES and ".tiff" in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------------- memory


def test_region_reads_keep_memory_bounded(tmp_path):
    side, tile = 4096, 256
    n = side // tile
    path = tmp_path / "large.tif"

    def tile_pixels(i, j):  # deterministic, cheap, distinct per tile
        return np.full((tile, tile, 3), ((i * 7 + j * 13) % 251, i, j), np.uint8)

    tifffile.imwrite(
        path,
        (tile_pixels(i, j) for i in range(n) for j in range(n)),
        shape=(side, side, 3),
        dtype=np.uint8,
        photometric="rgb",
        tile=(tile, tile),
        compression="zlib",
    )
    raw = side * side * 3
    gc.collect()
    proc = psutil.Process(os.getpid())
    before = peak = proc.memory_info().rss
    step = 512
    with open_slide(path) as slide:
        for y in range(0, side, step):
            for x in range(0, side, step):
                region = slide.read_region(x, y, step, step)
                i, j = (y + step - 1) // tile, (x + step - 1) // tile  # bottom-right tile
                assert tuple(region[-1, -1]) == ((i * 7 + j * 13) % 251, i, j)
                peak = max(peak, proc.memory_info().rss)
        thumb = slide.thumbnail(256)
        peak = max(peak, proc.memory_info().rss)
    assert thumb.shape == (256, 256, 3)
    assert peak - before < raw / 3, f"RSS grew by {(peak - before) / 2**20:.0f} MiB for a {raw / 2**20:.0f} MiB slide"


# ----------------------------------------------------------------------------------- direct tile reads
def test_direct_tile_reads_jpeg_threads_and_out_buffer(tmp_path, rgb, labels):
    """Single-page tiled TIFFs are read tile by tile from the file (no zarr): JPEG tiles decode as
    tifffile decodes them, reads from several threads agree, and ``out=`` fills a given buffer."""
    from concurrent.futures import ThreadPoolExecutor

    jpeg = tmp_path / "jpeg.tif"
    tifffile.imwrite(jpeg, rgb, photometric="rgb", tile=(128, 128), compression="jpeg")
    whole = tifffile.imread(jpeg)
    with open_slide(jpeg) as slide:
        assert slide._read_level0_into is not None  # the direct path is the one tested here
        for x, y, w, h in WINDOWS:
            np.testing.assert_array_equal(slide.read_region(x, y, w, h), crop_padded(whole, x, y, w, h, 0))
        windows = [(x, y, 150, 130) for y in range(-20, H, 97) for x in range(-30, W, 111)]
        with ThreadPoolExecutor(4) as pool:
            regions = list(pool.map(lambda xywh: slide.read_region(*xywh, fill=7), windows))
        for (x, y, w, h), region in zip(windows, regions):
            np.testing.assert_array_equal(region, crop_padded(whole, x, y, w, h, 7))
        buffer = np.full((130, 150, 3), 99, np.uint8)
        assert slide.read_region(W - 50, 10, 150, 130, out=buffer) is buffer
        np.testing.assert_array_equal(buffer, crop_padded(whole, W - 50, 10, 150, 130, 0))
        with pytest.raises(ValueError, match="out must be"):
            slide.read_region(0, 0, 10, 10, out=buffer)
    mask = tmp_path / "mask.tif"  # greyscale strips through the same reader
    tifffile.imwrite(mask, labels, compression="zlib", rowsperstrip=64)
    with open_label_image(mask, H, W) as m:
        np.testing.assert_array_equal(m.read_region(-5, 30, 300, 200), crop_padded(labels, -5, 30, 300, 200, 0))


def test_header_only_checks(tmp_path, rgb, labels):
    png, tif = tmp_path / "s.png", tmp_path / "s.tif"
    Image.fromarray(rgb).save(png)
    tifffile.imwrite(tif, rgb, photometric="rgb", tile=(256, 256))
    assert slides_mod.slide_size(png) == slides_mod.slide_size(tif) == (H, W)
    Image.fromarray(labels).save(tmp_path / "m.png")
    slides_mod.check_label_image(tmp_path / "m.png", H, W)
    with pytest.raises(UserInputError, match="m.png.*mask is 600x700"):
        slides_mod.check_label_image(tmp_path / "m.png", H, W + 1)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    with pytest.raises(UserInputError, match="grey.png.*not an RGB slide"):
        slides_mod.slide_size(tmp_path / "grey.png")
    with pytest.raises(UserInputError, match="--max-pixels"):
        slides_mod.slide_size(png, max_pixels=1000)
