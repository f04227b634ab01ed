"""Multi-scale Cross-Attention Alignment (MCAA) of the DSDM generator (paper §IV-B2a, eqs. 10-11).

MCAA has two parts:

* :class:`EmbeddingTransform` -- the *embedding transform layer* ``Psi_FC``: one fully connected
  layer that maps the 512-d reference embedding ``F_r`` to ``K * C`` numbers, reshaped into ``K``
  tokens of width ``C`` (the channel width of one U-Net scale). One transform exists per scale.
* :class:`CrossAttentionAlignment` (CAA) -- cross-attention from U-Net features to those tokens,
  ``x + W_O softmax(Q K^T / sqrt(d)) V`` with ``Q = W_Q GroupNorm(F_m)`` and ``K = W_K T``,
  ``V = W_V T`` where ``T = Psi_FC(F_r)`` (eqs. 10-11 plus the residual connection the paper adds).
  The attention itself is MONAI's :class:`~monai.networks.blocks.CrossAttentionBlock` (multi-head,
  optional PyTorch SDPA); only the norm / reshape / residual around it is written here.

Deviation from eq. 10, on purpose: the paper writes ``K = W_K F_r`` (the raw embedding) and only
``V`` through ``Psi_FC``. A single key makes the softmax over keys identically 1, so the attention
would collapse to a per-image constant; both K and V are therefore computed from the ``K >= 2``
tokens, which is how the "reshaping to align with the multi-scale resolutions" is read here.
:class:`CrossAttentionAlignment` is generic (any ``context`` of shape ``(N, L, D)``) so the
segmentation stage (§IV-C2) can reuse it with diffusion features as context.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import CrossAttentionBlock
from torch import nn

__all__ = ["CrossAttentionAlignment", "EmbeddingTransform"]


class EmbeddingTransform(nn.Module):
    """``Psi_FC`` of eq. 10: ``(N, ref_dim)`` reference embedding -> ``(N, num_tokens, channels)``.

    The tokens are layer-normalised so that the attention logits do not depend on the scale of the
    reference encoder's output (a SimCLR embedding may be L2-normalised or not).
    """

    def __init__(self, ref_dim: int, channels: int, num_tokens: int) -> None:
        super().__init__()
        if num_tokens < 2:
            raise ValueError(
                f"num_tokens (ref_tokens) must be >= 2, got {num_tokens}: with one key the softmax of eq. 11 "
                "is always 1 and the cross-attention ignores the features; set ref_tokens to e.g. 16"
            )
        if ref_dim < 1 or channels < 1:
            raise ValueError(f"ref_dim and channels must be positive, got {ref_dim} and {channels}")
        self.ref_dim = ref_dim
        self.channels = channels
        self.num_tokens = num_tokens
        self.fc = nn.Linear(ref_dim, num_tokens * channels)  # Psi_FC
        self.norm = nn.LayerNorm(channels)

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        if ref.ndim != 2 or ref.shape[1] != self.ref_dim:
            raise ValueError(f"reference embedding must have shape (N, {self.ref_dim}), got {tuple(ref.shape)}")
        tokens = self.fc(ref).view(ref.shape[0], self.num_tokens, self.channels)
        return self.norm(tokens)


class CrossAttentionAlignment(nn.Module):
    """CAA (eq. 11 + residual): ``x + W_O Attention(Q=W_Q GN(x), K=W_K c, V=W_V c)``.

    Args:
        channels: channels ``C`` of the feature map ``x`` (queries).
        context_dim: width ``D`` of the context tokens (keys/values).
        num_head_channels: channels per attention head (``C`` must be divisible by it).
        norm_num_groups, norm_eps: GroupNorm applied to ``x`` before the query projection.
        use_flash_attention: use PyTorch's ``scaled_dot_product_attention``.

    The output projection is zero-initialised (as in latent diffusion's spatial transformer), so a
    freshly built block is the identity and training starts from the unconditioned U-Net.
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_head_channels: int,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        if num_head_channels < 1 or channels % num_head_channels != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_head_channels ({num_head_channels})")
        self.channels = channels
        self.context_dim = context_dim
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=channels, eps=norm_eps, affine=True)
        self.attn = CrossAttentionBlock(
            hidden_size=channels,
            num_heads=channels // num_head_channels,
            context_input_size=context_dim,
            qkv_bias=False,
            use_flash_attention=use_flash_attention,
        )
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, query_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x``: ``(N, C, H, W)``; ``context``: ``(N, L, D)``. Returns a tensor shaped like ``x``.

        ``query_pos`` (``(HW, C)``), if given, is added to the normalised queries (positional
        encoding; the segmentation CAA adds a matching one to its spatial context tokens).
        """
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape ({x.shape[0]}, L, {self.context_dim}), got {tuple(context.shape)}"
            )
        n, c, h, w = x.shape
        q = self.norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        if query_pos is not None:
            q = q + query_pos.to(q.dtype)
        out = self.attn(q, context=context.to(x.dtype))
        return x + out.transpose(1, 2).reshape(n, c, h, w)
