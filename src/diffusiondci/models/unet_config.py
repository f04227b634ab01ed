"""Configuration of the DSDM U-Net: :class:`UNetConfig` (JSON-safe, validated) and the named presets.

``tiny`` (64 px, CPU), ``tiny_narrow`` (the same at half the width of its two finer levels),
``tiny_v1`` (the tiny network before the speed work) and ``paper`` (256 px, SDM's layout at a
narrower width); :data:`UNET_PRESETS` maps the names used in config files
(``dsdm.unet``) to them. The network itself is :class:`diffusiondci.models.unet.DSDMUNet`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusiondci.errors import UserInputError

__all__ = [
    "DECODER_NORMS",
    "NUM_MASK_CLASSES",
    "SPADE_MODES",
    "UNET_PRESETS",
    "UNetConfig",
    "paper_config",
    "tiny_config",
    "tiny_narrow_config",
    "tiny_v1_config",
]

#: Classes of the semantic mask (0 background, 1 benign, 2 malignant).
NUM_MASK_CLASSES = 3
#: ``decoder_norm`` options: "spade" (mask-conditioned DSDM) or "group" (no-mask ablation / segmentation).
DECODER_NORMS = ("spade", "group")
#: ``spade_mode`` options (see :class:`UNetConfig`).
SPADE_MODES = ("per_block", "shared")


@dataclass
class UNetConfig:
    """Network configuration (JSON-safe via :meth:`to_dict` / :meth:`from_dict`).

    ``channels[i]`` is the width of level ``i`` (level ``i`` runs at ``image_size / 2**i``);
    ``attention_levels[i]`` puts self-attention in the encoder and decoder ResBlocks of level ``i``.
    The unconditional baseline is ``decoder_norm="group", use_reference=False``.
    """

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 6  # eps (3) + variance interpolation v (3): learned Sigma (iDDPM)
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_head_channels: int = 32
    decoder_norm: str = "spade"  # "spade" | "group"
    use_reference: bool = True  # False: "no reference" ablation, no MCAA layers
    ref_dim: int = 512
    ref_tokens: int = 16  # K tokens per scale from Psi_FC (must be >= 2)
    norm_num_groups: int = 32
    spade_hidden_channels: int = 128  # SDM: 128
    # MONAI's SPADE builds its gamma / beta convolutions with an InstanceNorm after them (the default
    # of monai Convolution); SDM's are plain convolutions. False (SDM) is the default; records written
    # before this field existed were trained with MONAI's and load with True (see from_dict).
    spade_modulation_norm: bool = False
    # "per_block": MONAI's SPADE in every norm (SDM's layout: mask encoder + gamma conv + beta conv each);
    # "shared": one mask encoder per decoder resolution, one fused gamma/beta conv per norm
    # (diffusiondci.models.spade; about a third of the decoder's convolutions). Records written before
    # this field existed were per_block, which is therefore the default here.
    spade_mode: str = "per_block"
    spade_kernel_size: int = 3  # kernel of the shared-mode gamma/beta convs (SDM: 3; the mask encoder is 3x3)
    # MCAA after the decoder ResBlocks of these levels (None: every level, as in the paper)
    mcaa_levels: tuple[bool, ...] | None = None
    use_flash_attention: bool = True  # PyTorch scaled_dot_product_attention
    num_mask_classes: int = field(default=NUM_MASK_CLASSES)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if self.mcaa_levels is not None:
            self.mcaa_levels = tuple(bool(a) for a in self.mcaa_levels)
        self.validate()

    def validate(self, path: str | Path | None = None) -> None:
        """Raise :class:`UserInputError` naming the offending ``model.*`` field."""

        def bad(msg: str) -> UserInputError:
            return UserInputError(f"model config: {msg}", path)

        levels = len(self.channels)
        if levels < 2:
            raise bad(f"channels needs at least 2 levels, got {list(self.channels)}")
        if len(self.attention_levels) != levels:
            raise bad(f"attention_levels has {len(self.attention_levels)} entries; give one per level ({levels})")
        if self.image_size < 2 ** (levels - 1) or self.image_size % 2 ** (levels - 1):
            raise bad(f"image_size {self.image_size} must be a multiple of 2**(levels-1) = {2 ** (levels - 1)}")
        if self.num_res_blocks < 1:
            raise bad(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if any(c < 1 or c % self.norm_num_groups for c in self.channels):
            raise bad(f"every channels entry must be a multiple of norm_num_groups={self.norm_num_groups}")
        if self.mcaa_levels is not None and len(self.mcaa_levels) != levels:
            raise bad(f"mcaa_levels has {len(self.mcaa_levels)} entries; give one per level ({levels}) or null")
        # the middle block (last level) always has self-attention
        heads_needed = [
            c
            for i, (c, a) in enumerate(zip(self.channels, self.attention_levels))
            if a or self.has_mcaa(i) or i == levels - 1
        ]
        if self.num_head_channels < 1 or any(c % self.num_head_channels for c in heads_needed):
            raise bad(f"channels with attention/MCAA {heads_needed} must be multiples of num_head_channels")
        if self.decoder_norm not in DECODER_NORMS:
            raise bad(f"decoder_norm must be one of {DECODER_NORMS}, got {self.decoder_norm!r}")
        if self.spade_mode not in SPADE_MODES:
            raise bad(f"spade_mode must be one of {SPADE_MODES}, got {self.spade_mode!r}")
        if self.spade_kernel_size < 1 or self.spade_kernel_size % 2 == 0:
            raise bad(f"spade_kernel_size must be odd and positive, got {self.spade_kernel_size}")
        if self.use_reference and self.ref_tokens < 2:
            raise bad(f"ref_tokens must be >= 2 (one key makes the MCAA softmax trivially 1), got {self.ref_tokens}")
        for name in ("in_channels", "out_channels", "ref_dim", "spade_hidden_channels", "num_mask_classes"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["attention_levels"] = list(self.attention_levels)
        d["mcaa_levels"] = list(self.mcaa_levels) if self.mcaa_levels is not None else None
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | Path | None = None) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`UserInputError` (``path`` is named)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"model config: unknown keys {unknown}; allowed: {sorted(known)}", path)
        data = {"spade_modulation_norm": True, **data}  # older records: the SPADE they were trained with
        try:
            return cls(**data)
        except UserInputError as err:
            raise UserInputError(str(err), path) from None
        except (TypeError, ValueError) as err:
            raise UserInputError(f"model config: {err}", path) from None

    @property
    def num_decoder_blocks(self) -> int:
        return len(self.channels) * (self.num_res_blocks + 1)

    def has_mcaa(self, level: int) -> bool:
        """Whether the decoder ResBlocks of ``level`` are followed by MCAA."""
        return self.use_reference and (self.mcaa_levels is None or self.mcaa_levels[level])


def tiny_config(**overrides: Any) -> UNetConfig:
    """64 px CPU preset: widths (32, 64, 64), 1 ResBlock per level, self-attention at 16x16 only.

    Departs from the paper's structure where that buys speed on a CPU (measured in
    ``benchmarks/dsdm_bench.py``; :func:`tiny_v1_config` is the earlier, paper-shaped tiny network):
    SPADE's mask encoder runs once per resolution with 1x1 gamma/beta convolutions
    (``spade_mode="shared"``, ``spade_kernel_size=1``) and MCAA follows the decoder blocks of the two
    coarser levels only (not the 64x64 one). About 2.3 M parameters with SPADE + MCAA (K = 16 tokens);
    6 decoder blocks.
    """
    return tiny_v1_config(**{"spade_mode": "shared", "spade_kernel_size": 1, "mcaa_levels": (False, True, True),
                             **overrides})


def tiny_narrow_config(**overrides: Any) -> UNetConfig:
    """:func:`tiny_config` with its two finer levels half as wide: widths (16, 32, 64), GroupNorm of 8
    groups, 16 channels per attention head; about 1.6 M parameters, half of them in MCAA's token
    projection. About 1.5x the training throughput of ``tiny`` and, on GlaS validation masks, samples
    segmented as well; but a segmenter initialised from it (same widths) validates lower (GlaS: with
    all labels and at 16 annotated slides, three runs; docs/user-guide.md), so it is not the default."""
    return tiny_config(**{"channels": (16, 32, 64), "norm_num_groups": 8, "num_head_channels": 16, **overrides})


def tiny_v1_config(**overrides: Any) -> UNetConfig:
    """The tiny network before the speed work: SDM-style SPADE in every norm (3x3 convolutions) and
    MCAA after every decoder block; about 3.1 M parameters (1.1 M for the unconditional baseline).
    Kept so that ``benchmarks/dsdm_bench.py`` can compare against it."""
    base = dict(
        image_size=64,
        channels=(32, 64, 64),
        num_res_blocks=1,
        attention_levels=(False, False, True),
        num_head_channels=32,
        norm_num_groups=16,
        spade_hidden_channels=32,
        spade_mode="per_block",
        ref_tokens=16,
    )
    base.update(overrides)
    return UNetConfig(**base)


def paper_config(**overrides: Any) -> UNetConfig:
    """256 px preset with SDM's layout at a smaller width.

    SDM/guided-diffusion at 256 px use channel multipliers (1, 1, 2, 2, 4, 4), 2 ResBlocks per level
    and attention at 32, 16 and 8 px with 64 channels per head, at base width 256 (555 M parameters
    in this assembly even without MCAA: too large for the paper's 5000 patches and our budget).
    Here base width 64: channels
    (64, 64, 128, 128, 256, 256), same depth and attention resolutions, so the 18 decoder blocks
    and the paper's tap indices {6-10} line up with SDM's. About 58 M parameters (49 M without MCAA).
    """
    base = dict(
        image_size=256,
        channels=(64, 64, 128, 128, 256, 256),
        num_res_blocks=2,
        attention_levels=(False, False, False, True, True, True),
        num_head_channels=64,
        norm_num_groups=32,
        spade_hidden_channels=128,
        ref_tokens=16,
    )
    base.update(overrides)
    return UNetConfig(**base)


#: Network presets by name (``dsdm.unet`` in a config file).
UNET_PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "tiny": tiny_config,
    "tiny_narrow": tiny_narrow_config,
    "tiny_v1": tiny_v1_config,
    "paper": paper_config,
}
