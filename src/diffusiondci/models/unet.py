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

from collections.abc import Callable, Mapping, Sequence
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

from diffusiondci.models.attention import CrossAttentionAlignment, EmbeddingTransform
from diffusiondci.models.spade import MaskEncoder, SharedSPADE
from diffusiondci.models.unet_config import (
    DECODER_NORMS,
    NUM_MASK_CLASSES,
    SPADE_MODES,
    UNET_PRESETS,
    UNetConfig,
    paper_config,
    tiny_config,
    tiny_narrow_config,
    tiny_v1_config,
)

# the configuration names are re-exported: ``from diffusiondci.models.unet import UNetConfig`` keeps working
__all__ = [
    "DECODER_NORMS",
    "NUM_MASK_CLASSES",
    "SPADE_MODES",
    "UNET_PRESETS",
    "DSDMUNet",
    "DecoderBlock",
    "UNetConfig",
    "paper_config",
    "tiny_config",
    "tiny_narrow_config",
    "tiny_v1_config",
]


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
