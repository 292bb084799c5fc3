"""The Qwen2.5-VL vision tower (ViT with 2-D RoPE and window attention) + patch merger.

Images are a batch axis: every image is one row of `[N, P]` patches (P padded to a
bucket), so attention never crosses images, and jit compiles once per (N, P) bucket.
Patches stay in the image processor's order (2 x 2 merge groups, row-major over
groups), which is the order the merger consumes and the language model expects.
Window attention needs no token permutation: a patch attends to the patches of its
own window (window id per patch, a mask), full-attention blocks to its whole image.
The result equals transformers', which permutes tokens into window-contiguous order
and back.
"""

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.models import attention, rope
from rwr_jax.models.layers import Projection, RMSNorm
from rwr_jax.models.numerics import Numerics


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(Numerics):
    """Hyperparameters of the Qwen2.5-VL vision tower.

    Attributes:
      depth: number of ViT blocks.
      hidden_size: ViT width (1280 in the 7B model).
      intermediate_size: SwiGLU MLP width.
      num_heads: attention heads.
      out_hidden_size: language-model width the merger projects to.
      patch_size: spatial patch side in pixels.
      temporal_patch_size: frames per patch (an image is repeated to fill them).
      spatial_merge_size: merger groups merge_size x merge_size patches into one token.
      window_size: window side in pixels for windowed blocks.
      fullatt_block_indexes: blocks that attend over the whole image.
      in_channels: image channels.
      rope_theta: base of the 2-D rotary embedding.
      rms_norm_eps: epsilon of the block and merger RMSNorms.
      dtype, param_dtype: compute / storage dtypes.
      attention_kernel: name in the "attention" registry.
    """

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_kernel: str = "xla"

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"VisionConfig: head_dim = hidden_size / num_heads must be a multiple of 4, got "
                             f"{self.hidden_size} / {self.num_heads}")
        if self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(f"VisionConfig.window_size ({self.window_size}) must be a multiple of "
                             f"spatial_merge_size * patch_size ({self.spatial_merge_size * self.patch_size})")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"VisionConfig.fullatt_block_indexes {bad} are outside 0..{self.depth - 1}")
        self.check_dtypes()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


def vision_config_from_hf(vision: dict, **overrides) -> VisionConfig:
    """Reads the `vision_config` section of a Qwen2.5-VL `config.json`."""
    if vision.get("hidden_act", "silu") != "silu":
        raise ValueError(f"vision_config.hidden_act must be 'silu', got {vision['hidden_act']!r}")
    rope_parameters = vision.get("rope_parameters") or {}
    return VisionConfig(
        depth=vision["depth"], hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
        num_heads=vision["num_heads"], out_hidden_size=vision["out_hidden_size"],
        patch_size=vision.get("patch_size", 14), temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=vision.get("spatial_merge_size", 2), window_size=vision.get("window_size", 112),
        fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        rope_theta=float(rope_parameters.get("rope_theta", 10_000.0)), **overrides)


@flax.struct.dataclass(kw_only=True)
class VisionInputs:
    """A padded batch of images for the vision tower (built on the host by `pack_images`).

    Attributes:
      patches: [N, P, patch_dim] float32 flattened patches, processor order.
      positions: [N, P, 2] int32 (row, column) of each patch in its image.
      window_ids: [N, P] int32 window of each patch (windowed blocks attend within it).
      patch_mask: [N, P] bool, False on padding patches and padding images.
    """

    patches: jax.Array
    positions: jax.Array
    window_ids: jax.Array
    patch_mask: jax.Array


def patch_bucket(num_patches: int, config: VisionConfig, minimum: int = 64) -> int:
    """The patch-count bucket of an image: the next power of two >= num_patches.

    Images of different sizes share one compiled vision tower per bucket; padding
    wastes at most half of a bucket.
    """
    bucket = max(minimum, config.merge_unit)
    while bucket < num_patches:
        bucket *= 2
    return bucket


def pack_images(pixel_values: np.ndarray, grid_thw: np.ndarray, config: VisionConfig, num_images: int,
                num_patches: int) -> VisionInputs:
    """Splits the processor's concatenated patches into a padded [N, P] batch.

    Args:
      pixel_values: [sum(t * h * w), patch_dim] float32, as the image processor returns.
      grid_thw: [n, 3] int (t, h, w) patch grid of each image; t must be 1.
      config: the vision config.
      num_images: N >= n, the image bucket.
      num_patches: P >= max(t * h * w), the patch bucket (a multiple of merge_unit).

    Returns:
      VisionInputs with NumPy arrays.
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    if len(grid_thw) > num_images:
        raise ValueError(f"{len(grid_thw)} images do not fit the image bucket num_images={num_images}")
    if num_patches % config.merge_unit:
        raise ValueError(f"num_patches ({num_patches}) must be a multiple of {config.merge_unit}")
    counts = grid_thw.prod(axis=1)
    if int(counts.sum()) != len(pixel_values):
        raise ValueError(f"grid_thw covers {int(counts.sum())} patches but pixel_values has {len(pixel_values)}")
    patches = np.zeros((num_images, num_patches, config.patch_dim), np.float32)
    positions = np.zeros((num_images, num_patches, 2), np.int32)
    window_ids = np.full((num_images, num_patches), -1, np.int32)
    patch_mask = np.zeros((num_images, num_patches), bool)
    window_groups = config.window_size // (m * config.patch_size)  # merged tokens per window side
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for i, (t, h, w) in enumerate(grid_thw):
        if t != 1 or h % m or w % m:
            raise ValueError(f"image {i}: grid {(t, h, w)} must have t == 1 and h, w multiples of {m}")
        n = int(t * h * w)
        if n > num_patches:
            raise ValueError(f"image {i} has {n} patches, more than the patch bucket num_patches={num_patches}")
        # Processor order: merge groups row-major, then m x m patches inside a group.
        rows = np.arange(h).reshape(h // m, m, 1, 1).repeat(w // m, 2).repeat(m, 3).transpose(0, 2, 1, 3)
        cols = np.arange(w).reshape(1, 1, w // m, m).repeat(h // m, 0).repeat(m, 1).transpose(0, 2, 1, 3)
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        windows_per_row = -(-(w // m) // window_groups)
        patches[i, :n] = pixel_values[offsets[i]:offsets[i + 1]]
        positions[i, :n] = np.stack([rows, cols], axis=-1)
        window_ids[i, :n] = (rows // m // window_groups) * windows_per_row + cols // m // window_groups
        patch_mask[i, :n] = True
    return VisionInputs(patches=patches, positions=positions, window_ids=window_ids, patch_mask=patch_mask)


def vision_rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D rotary tables: the first half of the frequencies follow rows, the second columns.

    Args:
      positions: [N, P, 2] int32 (row, column).

    Returns:
      (cos, sin), each [N, P, head_dim] float32.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, P, 2, head_dim / 4]
    freqs = freqs.reshape(*positions.shape[:-1], -1)  # [rows..., cols...]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with a fused qkv projection (HF `attn.qkv`)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        """[N, P, D] -> [N, P, D]; cos/sin [N, P, head_dim]; mask [N, P, P] bool."""
        c = self.config
        dtype, param_dtype = c.jnp_dtype, c.jnp_param_dtype
        qkv = Projection("npd,dshk->npshk", (c.hidden_size, 3, c.num_heads, c.head_dim),
                         ("embed", "qkv", "heads", "head_dim"), bias_axes=("qkv", "heads", "head_dim"),
                         dtype=dtype, param_dtype=param_dtype, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # transformers rotates vision q/k in float32, as `apply_rope` does.
        q = rope.apply_rope(q, cos, sin)
        k = rope.apply_rope(k, cos, sin)
        out = attention.attend(q, k, v, mask, scale=c.head_dim ** -0.5, kernel=c.attention_kernel)
        return Projection("nphk,hkd->npd", (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"),
                          bias_axes=("embed",), dtype=dtype, param_dtype=param_dtype, name="proj")(out)


class VisionMLP(nn.Module):
    """SwiGLU MLP with biases: down(silu(gate(x)) * up(x))."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        """[N, P, D] -> [N, P, D]."""
        c = self.config
        dense = functools.partial(Projection, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
        gate = dense("npd,df->npf", (c.hidden_size, c.intermediate_size), ("embed", "mlp"), bias_axes=("mlp",),
                     name="gate_proj")(x)
        up = dense("npd,df->npf", (c.hidden_size, c.intermediate_size), ("embed", "mlp"), bias_axes=("mlp",),
                   name="up_proj")(x)
        return dense("npf,fd->npd", (c.intermediate_size, c.hidden_size), ("mlp", "embed"), bias_axes=("embed",),
                     name="down_proj")(nn.silu(gate) * up)


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        """[N, P, D] -> [N, P, D]; mask [N, P, P] bool."""
        c = self.config
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.jnp_dtype,
                                 param_dtype=c.jnp_param_dtype)
        x = x + VisionAttention(c, name="attn")(norm(name="norm1")(x), cos, sin, mask)
        x = x + VisionMLP(c, name="mlp")(norm(name="norm2")(x))
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class PatchMerger(nn.Module):
    """RMSNorm, then each merge group of patches -> MLP (GELU) -> one language-model token."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        """[N, P, D] -> [N, P / merge_unit, out_hidden_size]."""
        c = self.config
        dtype, param_dtype = c.jnp_dtype, c.jnp_param_dtype
        x = RMSNorm(c.rms_norm_eps, dtype, param_dtype, name="ln_q")(x)
        width = c.hidden_size * c.merge_unit
        x = x.reshape(x.shape[0], -1, width)
        x = Projection("nmd,de->nme", (width, width), ("mlp", "embed"), bias_axes=("embed",), dtype=dtype,
                       param_dtype=param_dtype, name="mlp_0")(x)
        x = nn.gelu(x, approximate=False)
        return Projection("nme,ed->nmd", (width, c.out_hidden_size), ("mlp", "embed"), bias_axes=("embed",),
                          dtype=dtype, param_dtype=param_dtype, name="mlp_2")(x)


class PatchEmbed(nn.Module):
    """The Conv3d with kernel = stride = patch, as the linear map of a flattened patch it is."""

    config: VisionConfig

    @nn.compact
    def __call__(self, patches):
        """[N, P, patch_dim] -> [N, P, D]."""
        c = self.config
        return Projection("npk,kd->npd", (c.patch_dim, c.hidden_size), ("patch", "embed"), dtype=c.jnp_dtype,
                          param_dtype=c.jnp_param_dtype, name="proj")(patches)


class VisionTower(nn.Module):
    """Patch embedding, ViT blocks (windowed / full attention) and the patch merger (HF `visual`)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, images: VisionInputs) -> jax.Array:
        """Encodes a padded batch of images.

        Args:
          images: VisionInputs with [N, P, ...] arrays.

        Returns:
          [N, P / merge_unit, out_hidden_size] merged tokens (rows of padding patches
          hold garbage; `merged_token_mask` says which are real).
        """
        c = self.config
        x = PatchEmbed(c, name="patch_embed")(images.patches)
        cos, sin = vision_rope(images.positions, c.head_dim, c.rope_theta)
        valid = images.patch_mask
        same_image = valid[:, :, None] & valid[:, None, :]
        same_window = same_image & (images.window_ids[:, :, None] == images.window_ids[:, None, :])
        for i in range(c.depth):
            mask = same_image if i in c.fullatt_block_indexes else same_window
            x = VisionBlock(c, name=f"blocks_{i}")(x, cos, sin, mask)
        return PatchMerger(c, name="merger")(x)


def merged_token_mask(images: VisionInputs, config: VisionConfig) -> jax.Array:
    """[N, P / merge_unit] bool: which merged tokens come from real patches."""
    return images.patch_mask.reshape(images.patch_mask.shape[0], -1, config.merge_unit)[..., 0]
