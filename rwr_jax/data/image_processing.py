"""Qwen2.5-VL image preprocessing on the host: files -> RGB -> patches and grids.

    images = [load_image(path) for path in paths]
    processed = process_images(images, ImageProcessingConfig(), names=paths)
    processed.pixel_values      # [P, 3 * 2 * 14 * 14] float32, all images concatenated
    processed.grid_thw          # [N, 3] int32 (t, h, w) in patches, t == 1 for images
    processed.num_image_tokens  # [N] int32 <|image_pad|> tokens per image
    clip_pixel_values(images, ClipImageConfig(image_size=224))  # [N, 224, 224, 3] for a CLIP tower

The pixels come from `transformers`' PIL/NumPy Qwen2-VL image processor
(`Qwen2VLImageProcessorPil`, which Qwen2.5-VL uses unchanged; it needs neither torch
nor torchvision), so they are identical to what the reference pipeline feeds the
vision tower: resize with `smart_resize` (sides multiples of patch_size * merge_size,
pixel count within [min_pixels, max_pixels], aspect kept) and PIL bicubic, rescale by
1/255, normalise with the CLIP mean/std, each frame repeated temporal_patch_size
times. Layout of `pixel_values` (what the vision tower relies on): rows run over
(h // merge, w // merge, merge_row, merge_col), so each merge_size**2 consecutive rows
are one merged token, in raster order; columns run over (channel, temporal,
patch_row, patch_col).

Images deeper than 8 bits per channel (16-bit or float grayscale, as X-rays and CT
slices are often stored) are min-max scaled to 8 bits per image first: `transformers`
would clip them (a 16-bit ramp turns 99.6 % white).
"""

import dataclasses
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

# `smart_resize` refuses images whose long side exceeds this multiple of the short side.
MAX_ASPECT_RATIO = 200
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessingConfig:
    """Qwen2.5-VL image preprocessing settings (defaults: Med-RwR's).

    Attributes:
        min_pixels: smaller images are resized up to at least this many pixels.
        max_pixels: larger images are resized down to at most this many pixels
            (Med-RwR: 262,144 = 512 * 512).
        patch_size: side of a vision-tower patch, in pixels.
        temporal_patch_size: frames per patch; a still image is repeated this often.
        merge_size: patches merged per side into one language-model token.
        image_mean: per-channel (R, G, B) mean, in [0, 1] units.
        image_std: per-channel (R, G, B) standard deviation, in [0, 1] units.
    """

    min_pixels: int = 3136
    max_pixels: int = 262144
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageProcessingConfig.{name} must be an int >= 1, got {value!r}")
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"ImageProcessingConfig.max_pixels must be >= min_pixels ({self.min_pixels}), "
                             f"got {self.max_pixels}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"ImageProcessingConfig.{name} must hold 3 values (R, G, B), got {value}")

    @property
    def patch_dim(self) -> int:
        """Width of one row of `pixel_values`: 3 * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipImageConfig:
    """CLIP image preprocessing (transformers' CLIPImageProcessor): resize, crop, normalise.

    Attributes:
        image_size: S, the shortest side is resized to S (PIL bicubic), then centre-cropped to S x S.
        image_mean: per-channel (R, G, B) mean, in [0, 1] units.
        image_std: per-channel (R, G, B) standard deviation, in [0, 1] units.
    """

    image_size: int
    image_mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"ClipImageConfig.image_size must be an int >= 1, got {self.image_size!r}")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"ClipImageConfig.{name} must hold 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)


def clip_pixel_values(images: Sequence[Image.Image], config: ClipImageConfig) -> np.ndarray:
    """CLIP preprocessing as transformers' CLIPImageProcessor does it, channels last.

    Shortest side resized to image_size (PIL bicubic), centre crop to a square,
    rescale by 1/255, normalise with the config's mean / std.

    Returns:
        [N, S, S, 3] float32, S = config.image_size ([0, S, S, 3] for no images).
    """
    size = config.image_size
    if not images:
        return np.zeros((0, size, size, 3), np.float32)
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=list(config.image_mean), image_std=list(config.image_std))
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    return np.ascontiguousarray(np.asarray(pixels, np.float32).transpose(0, 2, 3, 1))


@dataclasses.dataclass(frozen=True)
class ProcessedImages:
    """Preprocessed images, ready for the vision tower.

    Attributes:
        pixel_values: [P, patch_dim] float32, the patches of all images concatenated
            in order, P = sum of t * h * w over images.
        grid_thw: [N, 3] int32, (t, h, w) of each image in patches.
        num_image_tokens: [N] int32, <|image_pad|> tokens of each image,
            t * h * w // merge_size**2.
    """

    pixel_values: np.ndarray
    grid_thw: np.ndarray
    num_image_tokens: np.ndarray


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Reads an image file fully, turns it upright and converts it to RGB.

    The EXIF orientation is applied (as transformers' `load_image` does). Transparent
    images (RGBA, LA, palette with transparency) are composited onto white, as
    transformers' image processor does; grayscale and palette images are expanded to
    RGB. 16-bit images go through PIL's "RGB" conversion unchanged, which clips at
    255 (transformers does the same); rescale such images to 8 bits beforehand.

    Args:
        path: a local image file (any format PIL reads).

    Returns:
        The decoded RGB image.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a readable image, is truncated or corrupt, or
            its aspect ratio exceeds MAX_ASPECT_RATIO; the message names the file.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"image file {name!r} does not exist (or is not a file)")
    with open(name, "rb") as file:
        return _decode(file, name)


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decodes encoded image bytes (PNG, JPEG, ...) to RGB, as `load_image` does.

    Args:
        data: the encoded image.
        name: what error messages call the image (e.g. its record id).

    Returns:
        The decoded RGB image.

    Raises:
        ValueError: If the bytes are not a readable image or its aspect ratio exceeds
            MAX_ASPECT_RATIO; the message names `name`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data of {name!r} must be bytes, got {type(data).__name__}")
    return _decode(io.BytesIO(data), name)


def _decode(file, name: str) -> Image.Image:
    """Opens, fully decodes and converts to RGB; any decoding failure names the image."""
    try:
        with Image.open(file) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)  # A copy; keeps mode and transparency.
            if upright.mode in _HIGH_DEPTH_MODES:
                upright = _min_max_to_8_bits(upright)
            rgb = Image.fromarray(convert_to_rgb(upright, return_numpy=True))
    except _DECODE_ERRORS as error:
        raise ValueError(f"image {name!r} is not a readable image (corrupt, truncated or unsupported): "
                         f"{type(error).__name__}: {error}") from error
    _check_aspect_ratio(rgb.height, rgb.width, name)
    return rgb


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _min_max_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit / 32-bit / float grayscale image as 8-bit grayscale, its range stretched to 0-255."""
    pixels = np.asarray(image, np.float64)
    low, high = pixels.min(), pixels.max()
    scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def _check_aspect_ratio(height: int, width: int, name: str) -> None:
    if min(height, width) < 1:
        raise ValueError(f"image {name!r} must have height and width >= 1, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image {name!r} has aspect ratio {ratio:.1f} ({height}x{width} pixels, HxW); Qwen2.5-VL "
                         f"preprocessing accepts at most {MAX_ASPECT_RATIO}")


def resized_size(height: int, width: int, config: ImageProcessingConfig) -> tuple[int, int]:
    """Returns the (height, width) in pixels an image is resized to (transformers' smart_resize).

    Sides are multiples of patch_size * merge_size; the pixel count lies within
    [min_pixels, max_pixels] (except for extreme aspect ratios, where a side is
    clamped to one merge unit); the aspect ratio is kept as closely as possible.
    """
    _check_aspect_ratio(height, width, f"{height}x{width}")
    return hf_qwen2_vl.smart_resize(height, width, factor=config.patch_size * config.merge_size,
                                    min_pixels=config.min_pixels, max_pixels=config.max_pixels)


def image_grid_thw(height: int, width: int, config: ImageProcessingConfig) -> tuple[int, int, int]:
    """Returns the (t, h, w) patch grid of an image of this size, without its pixels."""
    resized_height, resized_width = resized_size(height, width, config)
    return 1, resized_height // config.patch_size, resized_width // config.patch_size


def image_token_counts(grid_thw: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """Number of <|image_pad|> tokens of each image.

    Args:
        grid_thw: [N, 3] int, (t, h, w) in patches.
        merge_size: patches merged per side into one token.

    Returns:
        [N] int32, t * h * w // merge_size**2.
    """
    grid_thw = np.asarray(grid_thw)
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [N, 3], got {grid_thw.shape}")
    return (np.prod(grid_thw, axis=-1) // merge_size**2).astype(np.int32)


def process_images(images: Sequence[Image.Image], config: ImageProcessingConfig,
                   names: Sequence[str | os.PathLike[str]] | None = None) -> ProcessedImages:
    """Turns images into vision-tower patches, exactly as transformers' processor does.

    Args:
        images: N >= 1 PIL images (any mode; converted to RGB as in `load_image`).
        config: the preprocessing settings.
        names: N names (e.g. file paths) used in error messages; default "images[i]".

    Returns:
        ProcessedImages with pixel_values [P, config.patch_dim] float32, grid_thw
        [N, 3] int32 and num_image_tokens [N] int32.

    Raises:
        TypeError: If an image is not a PIL image.
        ValueError: If `images` is empty, `names` has the wrong length, or an image's
            aspect ratio exceeds MAX_ASPECT_RATIO (the message names the image).
    """
    images = list(images)
    if not images:
        raise ValueError("images must hold at least one image, got none")
    names = [f"images[{i}]" for i in range(len(images))] if names is None else [os.fspath(n) for n in names]
    if len(names) != len(images):
        raise ValueError(f"names must hold one name per image ({len(images)}), got {len(names)}")
    for image, name in zip(images, names):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {name!r} must be a PIL.Image.Image, got {type(image).__name__}")
        _check_aspect_ratio(image.height, image.width, name)
    outputs = _hf_processor(config)(images=images, return_tensors="np")
    grid_thw = np.asarray(outputs["image_grid_thw"], dtype=np.int32)
    return ProcessedImages(
        pixel_values=np.asarray(outputs["pixel_values"], dtype=np.float32),
        grid_thw=grid_thw,
        num_image_tokens=image_token_counts(grid_thw, config.merge_size),
    )


def _hf_processor(config: ImageProcessingConfig) -> hf_qwen2_vl.Qwen2VLImageProcessorPil:
    """transformers' Qwen2-VL PIL image processor with these settings (cheap: ~0.1 ms)."""
    return hf_qwen2_vl.Qwen2VLImageProcessorPil(
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size,
        merge_size=config.merge_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
