"""The DSDM denoising U-Net (paper §IV-B2a, Fig. 1) and its segmentation backbone (§IV-C2).

Built from MONAI 1.6 blocks (``monai.networks.nets.diffusion_model_unet`` /
``spade_diffusion_model_unet``), not from MONAI's ready-made ``SPADEDiffusionModelUNet``: that class
runs each up-level as one opaque module, so there is no place to put a cross-attention after *every*
decoder ResBlock, nor a per-block feature tap; its built-in cross-attention exists only at attention
levels and takes one context for all scales. Assembled here from MONAI parts:

* encoder: MONAI ``DownBlock`` / ``AttnDownBlock`` (ResBlocks with GroupNorm + SiLU + timestep
  embedding, self-attention at the configured levels); middle: MONAI ``AttnMidBlock``;
* decoder: one :class:`DecoderBlock` per decoder ResBlock = MONAI ``SPADEDiffResBlock`` (mask via
  SPADE) or ``DiffusionUNetResnetBlock`` (plain GroupNorm), then MONAI ``SpatialAttentionBlock`` at
  attention levels, then MCAA (:mod:`diffusiondci.models.attention`), then the level's upsampler;
* output: GroupNorm, SiLU, zero-initialised 3x3 conv to ``2 * 3`` channels (eps and the iDDPM
  variance interpolation ``v``; the diffusion maths lives in :mod:`diffusiondci.diffusion`).

Written by hand: the MCAA token transform, the block taps and the null conditions.

Decoder block numbering (the feature taps, paper Fig. 3 / §IV-C1 "blocks {6-10}"): blocks are
numbered ``0 .. num_decoder_blocks - 1`` in execution order, ``num_res_blocks + 1`` per level from
the lowest resolution up, exactly like guided-diffusion's ``output_blocks`` that ddpm-segmentation
hooks. A tap is the block's output, i.e. *after* the upsampler for the last block of a level (so it
is at twice that level's resolution, as in guided-diffusion). ``decoder_feature_shapes`` lists the
``(C, H, W)`` of every tap for ``image_size``. :func:`paper_config` has 6 levels x 3 blocks = 18
decoder blocks like SDM/guided-diffusion at 256 px, so the paper's indices 6-10 mean the same blocks.

Conditions (``forward(x_t, t, mask, ref)``):

* ``mask``: ``(N, 3, H, W)`` one-hot float (or ``(N, H, W)`` integer labels, one-hot encoded here).
  The NULL mask is all zeros (SDM zeroes the mask); ``mask=None`` means the NULL mask.
* ``ref``: ``(N, 512)`` reference embedding. The NULL reference is a *learned* embedding
  ``null_ref`` (initialised to zeros, so it starts equal to a zero embedding and is then trained by the
  classifier-free-guidance drop-outs); ``ref=None`` means the NULL reference.
* A condition the configuration does not use (``mask`` with ``decoder_norm="group"``, ``ref`` with
  ``use_reference=False``) is accepted and ignored, so training/sampling code can pass the same
  condition dict to every ablation.

Known differences from SDM's guided-diffusion network (documented, accepted): MONAI's ResBlocks add
the timestep embedding after the first conv instead of SDM's scale/shift after the second norm; the
middle block uses GroupNorm (MONAI puts SPADE in up blocks only; SDM also in the middle block);
SPADE's hidden conv uses LeakyReLU(0.01) (MONAI) instead of ReLU. MONAI's SPADE normalises with an
*affine* GroupNorm; it is swapped here for the parameter-free GroupNorm of SPADE/SDM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SpatialAttentionBlock
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUNetResnetBlock,
    WrappedUpsample,
    get_down_block,
    get_mid_block,
    get_timestep_embedding,
    zero_module,
)
from monai.networks.nets.spade_diffusion_model_unet import SPADEDiffResBlock
from torch import nn

from diffusiondci.errors import UserInputError
from diffusiondci.models.attention import CrossAttentionAlignment, EmbeddingTransform
from diffusiondci.models.spade import MaskEncoder, SharedSPADE

__all__ = [
    "DECODER_NORMS",
    "NUM_MASK_CLASSES",
    "DSDMUNet",
    "DecoderBlock",
    "UNetConfig",
    "UNET_PRESETS",
    "paper_config",
    "tiny_config",
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
    base = dict(
        image_size=64,
        channels=(32, 64, 64),
        num_res_blocks=1,
        attention_levels=(False, False, True),
        num_head_channels=32,
        norm_num_groups=16,
        spade_hidden_channels=32,
        spade_mode="shared",
        spade_kernel_size=1,
        mcaa_levels=(False, True, True),
        ref_tokens=16,
    )
    base.update(overrides)
    return UNetConfig(**base)


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
    "tiny_v1": tiny_v1_config,
    "paper": paper_config,
}


class DecoderBlock(nn.Module):
    """One decoder step (one "output block"): concat skip -> ResBlock -> [self-attn] -> [MCAA] -> [upsample].

    ``level`` is the U-Net level (0 = full resolution) whose ResBlock this is.
    """

    def __init__(
        self,
        resnet: nn.Module,
        attention: nn.Module | None,
        mcaa: CrossAttentionAlignment | None,
        upsampler: nn.Module | None,
        level: int,
    ) -> None:
        super().__init__()
        self.resnet = resnet
        self.attention = attention
        self.mcaa = mcaa
        self.upsampler = upsampler
        self.level = level
        self.uses_mask = isinstance(resnet, SPADEDiffResBlock)

    def forward(
        self,
        h: torch.Tensor,
        skip: torch.Tensor,
        emb: torch.Tensor,
        seg: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = torch.cat([h, skip], dim=1)
        h = self.resnet(h, emb, seg) if self.uses_mask else self.resnet(h, emb)
        if self.attention is not None:
            h = self.attention(h).contiguous()
        if self.mcaa is not None:
            h = self.mcaa(h, tokens)
        if self.upsampler is not None:
            h = self.upsampler(h, emb)
        return h


def _param_free_spade(block: SPADEDiffResBlock, modulation_norm: bool = False) -> SPADEDiffResBlock:
    """Make the SPADE base normalisation parameter-free (MONAI builds it with ``affine=True``) and,
    unless ``modulation_norm``, its gamma / beta convolutions plain as in SDM (MONAI follows each with
    an InstanceNorm, which forces zero spatial mean on beta and on gamma). Neither change touches the
    parameters, so state dicts are the same either way."""
    for spade in (block.norm1, block.norm2):
        gn = spade.param_free_norm
        spade.param_free_norm = nn.GroupNorm(gn.num_groups, gn.num_channels, eps=gn.eps, affine=False)
        if not modulation_norm:
            for conv in (spade.mlp_gamma, spade.mlp_beta):
                if hasattr(conv, "adn"):
                    conv.adn = nn.Identity()
    return block


class DSDMUNet(nn.Module):
    """DSDM denoiser ``eps_theta(x_t, t, mask, ref)`` with learned variance (see module docstring)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else tiny_config()
        cfg.validate()
        self.config = cfg
        ch = cfg.channels
        levels = len(ch)
        groups, eps = cfg.norm_num_groups, 1e-6
        temb = ch[0] * 4
        attn = dict(use_flash_attention=cfg.use_flash_attention)

        self.conv_in = Convolution(2, cfg.in_channels, ch[0], strides=1, kernel_size=3, padding=1, conv_only=True)
        self.time_embed = nn.Sequential(nn.Linear(ch[0], temb), nn.SiLU(), nn.Linear(temb, temb))

        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            self.down_blocks.append(
                get_down_block(
                    spatial_dims=2,
                    in_channels=ch[max(i - 1, 0)],
                    out_channels=ch[i],
                    temb_channels=temb,
                    num_res_blocks=cfg.num_res_blocks,
                    norm_num_groups=groups,
                    norm_eps=eps,
                    add_downsample=i < levels - 1,
                    resblock_updown=False,
                    with_attn=cfg.attention_levels[i],
                    with_cross_attn=False,
                    num_head_channels=cfg.num_head_channels,
                    transformer_num_layers=1,
                    cross_attention_dim=None,
                    **attn,
                )
            )
        self.middle_block = get_mid_block(
            spatial_dims=2,
            in_channels=ch[-1],
            temb_channels=temb,
            norm_num_groups=groups,
            norm_eps=eps,
            with_conditioning=False,
            num_head_channels=cfg.num_head_channels,
            transformer_num_layers=1,
            cross_attention_dim=None,
            **attn,
        )

        # Psi_FC, one per scale (decoder level) with MCAA, shared by the MCAA blocks of that level.
        self.ref_transforms = (
            nn.ModuleDict(
                {str(i): EmbeddingTransform(cfg.ref_dim, c, cfg.ref_tokens) for i, c in enumerate(ch) if cfg.has_mcaa(i)}
            )
            if cfg.use_reference
            else None
        )
        shared_spade = cfg.decoder_norm == "spade" and cfg.spade_mode == "shared"
        # shared SPADE: one mask encoder per decoder level (diffusiondci.models.spade)
        self.mask_encoders = (
            nn.ModuleList(
                MaskEncoder(cfg.num_mask_classes, cfg.spade_hidden_channels) for _ in ch
            )
            if shared_spade
            else None
        )
        # Learned NULL reference for classifier-free guidance (zeros at init).
        self.null_ref = nn.Parameter(torch.zeros(cfg.ref_dim)) if cfg.use_reference else None

        self.decoder_blocks = nn.ModuleList()
        shapes: list[tuple[int, int, int]] = []
        prev_out = ch[-1]
        for level in reversed(range(levels)):
            out_ch = ch[level]
            skip_last = ch[max(level - 1, 0)]  # last block of a level takes the skip from the level above
            res = cfg.image_size // 2**level
            for j in range(cfg.num_res_blocks + 1):
                in_ch = (prev_out if j == 0 else out_ch) + (skip_last if j == cfg.num_res_blocks else out_ch)
                if cfg.decoder_norm == "spade":
                    resnet: nn.Module = _param_free_spade(
                        SPADEDiffResBlock(
                            spatial_dims=2,
                            in_channels=in_ch,
                            temb_channels=temb,
                            label_nc=cfg.num_mask_classes,
                            out_channels=out_ch,
                            norm_num_groups=groups,
                            norm_eps=eps,
                            spade_intermediate_channels=cfg.spade_hidden_channels,
                        ),
                        cfg.spade_modulation_norm,
                    )
                    if shared_spade:
                        hid, k = cfg.spade_hidden_channels, cfg.spade_kernel_size
                        resnet.norm1 = SharedSPADE(in_ch, hid, groups, eps, k)
                        resnet.norm2 = SharedSPADE(out_ch, hid, groups, eps, k)
                else:
                    resnet = DiffusionUNetResnetBlock(
                        spatial_dims=2,
                        in_channels=in_ch,
                        temb_channels=temb,
                        out_channels=out_ch,
                        norm_num_groups=groups,
                        norm_eps=eps,
                    )
                attention = (
                    SpatialAttentionBlock(2, out_ch, cfg.num_head_channels, groups, eps, **attn)
                    if cfg.attention_levels[level]
                    else None
                )
                mcaa = (
                    CrossAttentionAlignment(out_ch, out_ch, cfg.num_head_channels, groups, eps, **attn)
                    if cfg.has_mcaa(level)
                    else None
                )
                last = j == cfg.num_res_blocks
                upsampler = None
                if last and level > 0:
                    upsampler = WrappedUpsample(
                        spatial_dims=2,
                        mode="nontrainable",
                        in_channels=out_ch,
                        out_channels=out_ch,
                        interp_mode="nearest",
                        scale_factor=2.0,
                        post_conv=Convolution(2, out_ch, out_ch, strides=1, kernel_size=3, padding=1, conv_only=True),
                        align_corners=None,
                    )
                self.decoder_blocks.append(DecoderBlock(resnet, attention, mcaa, upsampler, level))
                shapes.append((out_ch, res * 2, res * 2) if upsampler is not None else (out_ch, res, res))
            prev_out = out_ch
        self._feature_shapes = tuple(shapes)

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch[0], eps=eps, affine=True),
            nn.SiLU(),
            zero_module(Convolution(2, ch[0], cfg.out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)),
        )

    # ----------------------------------------------------------------- introspection / taps
    @property
    def num_decoder_blocks(self) -> int:
        return len(self.decoder_blocks)

    @property
    def decoder_block_names(self) -> list[str]:
        """Module paths of the decoder blocks, index = tap number (use with ``get_submodule`` / hooks)."""
        return [f"decoder_blocks.{i}" for i in range(len(self.decoder_blocks))]

    @property
    def decoder_feature_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """``(C, H, W)`` of each decoder block's output at ``config.image_size`` (scales with the input)."""
        return self._feature_shapes

    # ----------------------------------------------------------------- conditions
    def null_conditions(self, batch_size: int, device: torch.device | str | None = None) -> dict[str, Any]:
        """NULL conditions for classifier-free guidance (eq. 17).

        ``mask``: ``(N, 3, H, W)`` zeros at ``image_size`` (``None`` if the decoder has no SPADE);
        ``ref``: the learned ``null_ref`` expanded to ``(N, ref_dim)`` (``None`` without MCAA).
        """
        cfg = self.config
        dev = torch.device(device) if device is not None else self.conv_in.conv.weight.device
        mask = None
        if cfg.decoder_norm == "spade":
            mask = torch.zeros(batch_size, cfg.num_mask_classes, cfg.image_size, cfg.image_size, device=dev)
        ref = self.null_ref.to(dev).unsqueeze(0).expand(batch_size, -1) if self.null_ref is not None else None
        return {"mask": mask, "ref": ref}

    def _prepare_mask(self, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k = self.config.num_mask_classes
        if mask is None:
            return x.new_zeros(n, k, h, w)
        if mask.ndim == 3 and not mask.is_floating_point():
            if mask.numel() and (mask.min() < 0 or mask.max() >= k):
                raise ValueError(f"mask labels must be in [0, {k - 1}]")
            mask = F.one_hot(mask.long(), k).permute(0, 3, 1, 2)
        if mask.ndim != 4 or tuple(mask.shape) != (n, k, h, w):
            raise ValueError(
                f"mask must be one-hot (N, {k}, H, W) = {(n, k, h, w)} or labels (N, H, W), got {tuple(mask.shape)}"
            )
        return mask.to(dtype=x.dtype, device=x.device)

    def _prepare_tokens(self, ref: torch.Tensor | None, n: int, x: torch.Tensor) -> dict[int, torch.Tensor]:
        assert self.ref_transforms is not None and self.null_ref is not None
        if ref is None:
            ref = self.null_ref.unsqueeze(0).expand(n, -1)
        if tuple(ref.shape) != (n, self.config.ref_dim):
            raise ValueError(f"ref must have shape ({n}, {self.config.ref_dim}), got {tuple(ref.shape)}")
        ref = ref.to(dtype=x.dtype, device=x.device)
        return {int(level): transform(ref) for level, transform in self.ref_transforms.items()}

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int | float,
        mask: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
        return_features: Sequence[int] | None = None,
        inject: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        features_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]] | dict[int, torch.Tensor]:
        """Predict ``(N, out_channels, H, W)``: channels ``[:3]`` = eps, ``[3:]`` = variance interpolation v.

        Args:
            x_t: noisy images ``(N, in_channels, H, W)``, H and W multiples of ``2**(levels-1)``.
            t: timesteps ``(N,)`` (or a scalar, broadcast).
            mask: one-hot ``(N, 3, H, W)`` or labels ``(N, H, W)``; ``None`` = NULL mask (zeros).
            ref: reference embeddings ``(N, ref_dim)``; ``None`` = learned NULL reference.
            return_features: decoder block indices to tap; if given, returns ``(output, {index: feature})``.
            inject: ``{block index: fn}``; ``fn`` maps the block's output to what the next block gets
                (the segmentation stage's feature injection, §IV-C2). Taps see the injected output.
            features_only: with ``return_features``, stop after the deepest tapped block and return
                only ``{index: feature}`` (frozen feature extraction skips the rest of the decoder).
        """
        cfg = self.config
        if x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"x_t must have shape (N, {cfg.in_channels}, H, W), got {tuple(x_t.shape)}")
        n, _, h, w = x_t.shape
        f = 2 ** (len(cfg.channels) - 1)
        if h % f or w % f:
            raise ValueError(f"x_t height and width must be multiples of {f}, got {h}x{w}")
        wanted: set[int] = set()
        if return_features is not None:
            wanted = {int(i) for i in return_features}
            bad = sorted(i for i in wanted if not 0 <= i < self.num_decoder_blocks)
            if bad:
                raise ValueError(f"decoder block indices {bad} out of range 0..{self.num_decoder_blocks - 1}")

        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(n)
        emb = self.time_embed(get_timestep_embedding(t, cfg.channels[0]).to(x_t.dtype))
        seg = self._prepare_mask(mask, x_t) if cfg.decoder_norm == "spade" else None
        tokens = self._prepare_tokens(ref, n, x_t) if cfg.use_reference else {}
        # what each level's SPADE reads: the mask itself, or (shared mode) its level's encoded mask
        level_seg: dict[int, torch.Tensor | None] = {}
        for level in range(len(cfg.channels)):
            if self.mask_encoders is not None and seg is not None:
                level_seg[level] = self.mask_encoders[level](seg, (h // 2**level, w // 2**level))
            else:
                level_seg[level] = seg

        hid = self.conv_in(x_t)
        skips = [hid]
        for block in self.down_blocks:
            hid, res = block(hidden_states=hid, temb=emb, context=None)
            skips.extend(res)
        hid = self.middle_block(hidden_states=hid, temb=emb, context=None)

        features: dict[int, torch.Tensor] = {}
        last_wanted = max(wanted) if wanted else -1
        for i, block in enumerate(self.decoder_blocks):
            hid = block(hid, skips.pop(), emb, level_seg[block.level], tokens.get(block.level))
            if inject is not None and i in inject:
                hid = inject[i](hid)
            if i in wanted:
                features[i] = hid
                if features_only and i == last_wanted:
                    return features
        if features_only:
            raise ValueError("features_only needs return_features")
        out = self.out(hid)
        if return_features is not None:
            return out, features
        return out
