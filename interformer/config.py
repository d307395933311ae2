"""Model configurations, all in one place (spec §2-§5).

`light` and `tiny` are the official InterFormer variants; `small` is a reduced model with the same
structure for fast CPU tests and training demos. Every other part of the project (jobs, server,
checkpoint loader) picks a variant by name from `CONFIGS`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real

# Input normalisation, RGB on the 0-255 scale (spec §2).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32
PYRAMID_CHANNELS = (32, 64, 128, 256)
PYRAMID_STRIDES = (4, 8, 16, 32)
DEFAULT_MAX_ENCODE_MEMORY_GIB = 16.0  # one encoder on a 24 GiB machine: Light up to 10413 tokens (1920x1080 fits)


@dataclass(frozen=True)
class ViTConfig:
    """MAE ViT with BEiT-style relative position bias (spec §2)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    train_size: int = 512  # grid the position embedding and bias tables were trained for
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    layer_scale_init: float = 1.0

    @property
    def window(self) -> int:
        return self.train_size // self.patch_size


@dataclass(frozen=True)
class IMSAConfig:
    """I-MSA neck (spec §4)."""

    dims: tuple[int, ...] = PYRAMID_CHANNELS
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    mlp_ratios: tuple[int, ...] = (8, 8, 4, 4)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    refine_start: tuple[int, ...] = (1, 1, 2, 1)
    target_sizes: tuple[int, ...] = (128, 64, 32, 16)
    pool_ratios: tuple[tuple[int, ...], ...] = ((12, 16, 20, 24), (6, 8, 10, 12), (3, 4, 5, 6), (1, 2, 3, 4))
    drop_path_rate: float = 0.1
    num_ref_values: int = 5

    @property
    def coarse_depths(self) -> tuple[int, ...]:
        return tuple(min(d, r) for d, r in zip(self.depths, self.refine_start))

    @property
    def refine_depths(self) -> tuple[int, ...]:
        return tuple(d - c for d, c in zip(self.depths, self.coarse_depths))


@dataclass(frozen=True)
class HeadConfig:
    """UPerHead + auxiliary FCN head (spec §5)."""

    channels: int = 64
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    num_classes: int = 2
    dropout: float = 0.1
    aux_in_index: int = 2
    aux_channels: int = 64
    aux_loss_weight: float = 0.4


@dataclass(frozen=True)
class ZoomInConfig:
    """Feature-level zoom-in for the refine stages (spec §4.4; demo defaults)."""

    enabled: bool = True
    start_click: int = 3  # 1-based click index from which an ROI is used (demo: skip_clicks=2)
    expand_ratio: float = 1.4
    min_size: int = 32
    max_stride: int = 32


@dataclass(frozen=True)
class ClickConfig:
    """Reference-label click encoding (spec §4.1)."""

    inner_radius: float = 5.0


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vit: ViTConfig = field(default_factory=ViTConfig)
    imsa: IMSAConfig = field(default_factory=IMSAConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    zoom_in: ZoomInConfig = field(default_factory=ZoomInConfig)
    clicks: ClickConfig = field(default_factory=ClickConfig)
    layer_decay_rate: float = 0.65

    def to_dict(self) -> dict:
        return asdict(self)


LIGHT = ModelConfig(name="light", vit=ViTConfig(768, 12, 12), layer_decay_rate=0.65)
TINY = ModelConfig(
    name="tiny",
    vit=ViTConfig(1024, 24, 16),
    imsa=IMSAConfig(depths=(2, 2, 6, 3), refine_start=(1, 1, 2, 1)),
    layer_decay_rate=0.75,
)
# Same structure and pyramid as the official models, with a narrow, shallow ViT: for tests and CPU demos.
SMALL = ModelConfig(name="small", vit=ViTConfig(embed_dim=96, depth=2, num_heads=3), layer_decay_rate=0.65)
# The refine-stage (zoom-in) structure of Tiny on the small ViT, so tests cover refine blocks cheaply.
SMALL_REFINE = replace(SMALL, name="small_refine", imsa=IMSAConfig(depths=(2, 2, 3, 2), refine_start=(1, 1, 2, 1)))

CONFIGS: dict[str, ModelConfig] = {c.name: c for c in (LIGHT, TINY, SMALL, SMALL_REFINE)}


def get_config(name: str) -> ModelConfig:
    """Return the named model configuration, with a clear error for unknown names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown InterFormer variant {name!r}; choose one of {sorted(CONFIGS)}") from None


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes network input; part of the encoder fingerprint."""

    max_side: int | None = None  # resize so the longest side is at most this (None: native size)
    size_divisor: int = SIZE_DIVISOR
    max_pixels: int = 50_000_000  # larger images are refused (decompression-bomb guard)
    # GiB the encoder's attention may take for one image (interformer.encode_memory); larger ones are refused
    max_encode_memory_gib: float = DEFAULT_MAX_ENCODE_MEMORY_GIB

    def __post_init__(self) -> None:
        """Refuse settings that would silently produce unusable input (a 1x1 image, clicks mapped to negative
        pixels, a canvas the /32 pyramid cannot divide) or fail deep inside preprocessing."""
        if self.max_side is not None and (not _is_int(self.max_side) or self.max_side < SIZE_DIVISOR):
            raise ValueError(f"PreprocessConfig.max_side must be None (native size) or an integer >= {SIZE_DIVISOR}, "
                             f"got {self.max_side!r}")
        if not _is_int(self.size_divisor) or self.size_divisor <= 0 or self.size_divisor % SIZE_DIVISOR:
            raise ValueError(f"PreprocessConfig.size_divisor must be a positive multiple of {SIZE_DIVISOR} (the "
                             f"pyramid's coarsest stride), got {self.size_divisor!r}")
        if not _is_int(self.max_pixels) or self.max_pixels < 1:
            raise ValueError(f"PreprocessConfig.max_pixels must be an integer >= 1, got {self.max_pixels!r}")
        budget = self.max_encode_memory_gib
        if isinstance(budget, bool) or not isinstance(budget, Real) or not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"PreprocessConfig.max_encode_memory_gib must be a finite number > 0 (GiB), "
                             f"got {budget!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(value: object) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, Integral) and not isinstance(value, bool)
