"""Tests for rwr_jax.data.image_processing: parity with transformers' Qwen2-VL image processor.

Pixel values are compared with `assert_array_equal`: the module runs the same
transformers code path on the same PIL image, so any difference at all (not just a
large one) would mean the inputs diverged (RGB conversion, orientation, settings).
The layout test rebuilds the image from an independent NumPy formula and allows
1e-6 (float32 rounding of a different operation order).
"""

import io
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import image_utils as hf_image_utils  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from rwr_jax.data import image_processing  # noqa: E402

CONFIG = image_processing.ImageProcessingConfig()


@pytest.fixture(scope="module")
def reference():
    """transformers' processor with Med-RwR's pixel limits."""
    return Qwen2VLImageProcessorPil(min_pixels=CONFIG.min_pixels, max_pixels=CONFIG.max_pixels)


def _reference_outputs(reference, images):
    out = reference(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def _rgb(height, width, seed=0):
    """A deterministic RGB image: smooth gradients plus fixed-seed noise."""
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 255 // max(height - 1, 1), cols * 255 // max(width - 1, 1), (rows + cols) % 256], -1)
    noise = np.random.default_rng(seed).integers(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), "RGB")


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


# (height, width): tiny (resized up), exact multiples, odd sizes, wide/tall, large (resized down).
SIZES = [(1, 1), (5, 7), (20, 300), (56, 56), (97, 131), (300, 17), (28, 3000), (700, 1000), (1000, 700)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_transformers(reference, size):
    image = _rgb(*size, seed=size[0] + size[1])
    got = image_processing.process_images([image], CONFIG)
    want_pixels, want_grid = _reference_outputs(reference, [image])
    assert got.pixel_values.dtype == np.float32 and got.grid_thw.dtype == np.int32
    np.testing.assert_array_equal(got.pixel_values, want_pixels)
    np.testing.assert_array_equal(got.grid_thw, want_grid)
    t, h, w = got.grid_thw[0]
    assert got.pixel_values.shape == (t * h * w, CONFIG.patch_dim) == (t * h * w, 1176)
    assert (t, h, w) == image_processing.image_grid_thw(*size, CONFIG)
    np.testing.assert_array_equal(got.num_image_tokens, [t * h * w // 4])


def test_grids_by_hand():
    """smart_resize worked by hand for Med-RwR's limits (factor 28, 3,136..262,144 pixels)."""
    # 700x1000 (HxW): 784x1008 is too big; beta = sqrt(7e5 / 262144) = 1.634,
    # floor(700 / 1.634 / 28) * 28 = 420, floor(1000 / 1.634 / 28) * 28 = 588.
    assert image_processing.resized_size(700, 1000, CONFIG) == (420, 588)
    assert image_processing.image_grid_thw(700, 1000, CONFIG) == (1, 30, 42)
    # 5x7 is resized up: beta = sqrt(3136 / 35) = 9.47, ceil(47.3 / 28) * 28 = 56, ceil(66.3 / 28) * 28 = 84.
    assert image_processing.resized_size(5, 7, CONFIG) == (56, 84)
    # 512x512 is kept: 18.3 -> 18 merge units per side, 504 pixels, 36 patches.
    assert image_processing.image_grid_thw(512, 512, CONFIG) == (1, 36, 36)
    np.testing.assert_array_equal(
        image_processing.image_token_counts(np.array([[1, 30, 42], [1, 4, 6], [1, 36, 36]])), [315, 6, 324])


def test_pixel_layout():
    """Rows: (h // 2, w // 2, merge row, merge col); columns: (channel, temporal, patch row, patch col)."""
    image = _rgb(70, 90, seed=3)
    got = image_processing.process_images([image], CONFIG)
    _, h, w = got.grid_thw[0]
    resized = np.asarray(image.resize((w * 14, h * 14), Image.Resampling.BICUBIC), np.float64) / 255.0
    normalized = (resized - np.array(CONFIG.image_mean)) / np.array(CONFIG.image_std)  # [H, W, 3]
    patches = got.pixel_values.reshape(h // 2, w // 2, 2, 2, 3, 2, 14, 14)
    rebuilt = patches.transpose(0, 2, 6, 1, 3, 7, 4, 5).reshape(h * 14, w * 14, 3, 2)
    np.testing.assert_array_equal(rebuilt[..., 0], rebuilt[..., 1])  # A still image repeats its frame.
    np.testing.assert_allclose(rebuilt[..., 0], normalized, rtol=0, atol=1e-6)


def test_several_images_in_one_call(reference):
    images = [_rgb(40, 60, seed=1), _rgb(700, 1000, seed=2), _rgb(3, 3, seed=4)]
    got = image_processing.process_images(images, CONFIG)
    want_pixels, want_grid = _reference_outputs(reference, images)
    np.testing.assert_array_equal(got.pixel_values, want_pixels)
    np.testing.assert_array_equal(got.grid_thw, want_grid)
    np.testing.assert_array_equal(got.num_image_tokens, np.prod(want_grid, -1) // 4)
    # The concatenation is image by image, in order.
    singles = [image_processing.process_images([image], CONFIG).pixel_values for image in images]
    np.testing.assert_array_equal(got.pixel_values, np.concatenate(singles))


def _mode_images():
    rgb = _rgb(45, 61, seed=5)
    alpha = Image.fromarray(np.tile(np.arange(61, dtype=np.uint8) * 4, (45, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 0
    gray_alpha = rgb.convert("L")
    gray_alpha.putalpha(alpha)
    return {
        "L": rgb.convert("L"), "RGBA": rgba, "P": rgb.convert("P"), "P_transparency": palette_transparent,
        "LA": gray_alpha,
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_modes_converted_like_transformers(reference, tmp_path, mode):
    path = _save(_mode_images()[mode], tmp_path / f"image_{mode.replace(';', '_')}.png")
    loaded = image_processing.load_image(path)
    assert loaded.mode == "RGB"
    with Image.open(path) as raw:  # transformers converts the raw file image itself.
        want_pixels, want_grid = _reference_outputs(reference, [raw])
    got = image_processing.process_images([loaded], CONFIG, names=[path])
    np.testing.assert_array_equal(got.pixel_values, want_pixels)
    np.testing.assert_array_equal(got.grid_thw, want_grid)


@pytest.mark.parametrize("kind", ["uint16_png", "12_bit_in_16_png", "float_tiff", "constant_uint16_png"])
def test_deep_grayscale_is_min_max_scaled_to_8_bits(tmp_path, kind):
    """16-bit / float X-ray-style images keep their content (transformers would clip
    them to white or black): min -> 0, max -> 255, linear in between."""
    ramp = np.linspace(0.0, 1.0, 64 * 48).reshape(48, 64)
    pixels = {"uint16_png": np.rint(ramp * 65535).astype(np.uint16),
              "12_bit_in_16_png": np.rint(100 + ramp * 3995).astype(np.uint16),
              "float_tiff": (0.25 + 0.5 * ramp).astype(np.float32),
              "constant_uint16_png": np.full((48, 64), 4000, np.uint16)}[kind]
    path = tmp_path / (f"{kind}.tif" if kind == "float_tiff" else f"{kind}.png")
    Image.fromarray(pixels).save(path)
    loaded = np.asarray(image_processing.load_image(path))
    assert loaded.shape == (48, 64, 3) and (loaded[..., 0] == loaded[..., 2]).all()
    if kind == "constant_uint16_png":
        assert not loaded.any()
        return
    assert loaded.min() == 0 and loaded.max() == 255
    # Within one level of the ideal ramp (the stored values are themselves rounded).
    np.testing.assert_allclose(loaded[..., 0], ramp * 255, atol=1.0)


def test_rgba_composited_on_white(tmp_path):
    transparent = Image.new("RGBA", (8, 6), (10, 20, 30, 0))
    loaded = image_processing.load_image(_save(transparent, tmp_path / "clear.png"))
    np.testing.assert_array_equal(np.asarray(loaded), np.full((6, 8, 3), 255, np.uint8))


def test_exif_orientation_like_transformers_load_image(reference, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    path = _save(_rgb(30, 50, seed=6), tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = image_processing.load_image(path)
    assert loaded.size == (30, 50)  # (width, height) after turning upright.
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(hf_image_utils.load_image(path)))
    got = image_processing.process_images([loaded], CONFIG)
    want_pixels, _ = _reference_outputs(reference, [hf_image_utils.load_image(path)])
    np.testing.assert_array_equal(got.pixel_values, want_pixels)


def test_decode_image_equals_load_image(tmp_path):
    path = _save(_rgb(20, 24, seed=7), tmp_path / "a.png")
    with open(path, "rb") as file:
        decoded = image_processing.decode_image(file.read(), name="record-7")
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image_processing.load_image(path)))


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        image_processing.load_image(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        image_processing.load_image(tmp_path)  # A directory.


@pytest.mark.parametrize("kind", ["random_bytes", "empty", "truncated_png", "text"])
def test_unreadable_file_names_it(tmp_path, kind):
    png = _png_bytes(_rgb(64, 64, seed=8))
    data = {
        "random_bytes": np.random.default_rng(9).integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated_png": png[: len(png) // 2],
        "text": b"not an image at all\n",
    }[kind]
    path = tmp_path / f"broken_{kind}.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"broken_{kind}.png"):
        image_processing.load_image(path)
    with pytest.raises(ValueError, match="record-42"):
        image_processing.decode_image(data, name="record-42")


def test_extreme_aspect_ratio_names_the_image(reference, tmp_path):
    path = _save(_rgb(2, 402, seed=10), tmp_path / "strip.png")  # Aspect 201.
    with pytest.raises(ValueError, match="strip.png.*aspect ratio 201"):
        image_processing.load_image(path)
    with Image.open(path) as strip:
        strip.load()
        with pytest.raises(ValueError, match="aspect ratio"):  # transformers refuses it too.
            reference(images=[strip], return_tensors="np")
        with pytest.raises(ValueError, match="scan-3"):
            image_processing.process_images([_rgb(4, 4), strip], CONFIG, names=["scan-2", "scan-3"])
    # Aspect exactly 200 is accepted, as in transformers.
    image_processing.process_images([_rgb(1, 200)], CONFIG)


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one image"):
        image_processing.process_images([], CONFIG)
    with pytest.raises(TypeError, match=r"images\[0\].*ndarray"):
        image_processing.process_images([np.zeros((4, 4, 3), np.uint8)], CONFIG)
    with pytest.raises(ValueError, match="names must hold one name per image"):
        image_processing.process_images([_rgb(4, 4)], CONFIG, names=["a", "b"])
    with pytest.raises(ValueError, match="max_pixels must be >= min_pixels"):
        image_processing.ImageProcessingConfig(min_pixels=100, max_pixels=99)
    with pytest.raises(ValueError, match="patch_size must be an int >= 1, got 0"):
        image_processing.ImageProcessingConfig(patch_size=0)
    with pytest.raises(ValueError, match=r"grid_thw must have shape \[N, 3\]"):
        image_processing.image_token_counts(np.zeros((2, 2), np.int32))


def test_works_without_torch(tmp_path):
    """The module imports and runs with torch and torchvision unimportable, bit-identically."""
    path = _save(_rgb(33, 47, seed=11), tmp_path / "a.png")
    out = tmp_path / "pixels.npy"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["torchvision"] = None
        import numpy as np
        from rwr_jax.data import image_processing as ip
        got = ip.process_images([ip.load_image({path!r})], ip.ImageProcessingConfig())
        np.save({str(out)!r}, got.pixel_values)
        assert sys.modules["torch"] is None
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    expected = image_processing.process_images([image_processing.load_image(path)], CONFIG).pixel_values
    np.testing.assert_array_equal(np.load(out), expected)
