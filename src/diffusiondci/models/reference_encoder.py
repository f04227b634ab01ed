"""Reference image encoder of the DSDM generator (paper §IV-B2a).

"A refined ResNet-18 ... stripping away the final classification layer and appending a fully
connected layer which produces vectors of dimension 512", trained with SimCLR (Chen et al. 2020,
see :mod:`diffusiondci.train.simclr`). The embedding is the high-level reference feature ``F_1``
that the Multi-scale Cross-Attention Alignment modules (MCAA) inject into the diffusion U-Net.

The backbone is MONAI's ResNet-18 (2-D, random init, nothing downloaded); its ``fc`` layer is the
appended 512-d projection. The stem follows the standard ImageNet ResNet-18 (7x7 stride-2 conv +
max-pool, shortcut convs without bias), so the stages run at 1/4, 1/8, 1/16 and 1/32 of the input.

Checkpoints are a folder with ``encoder.safetensors`` (weights) and ``encoder.json`` (config +
user metadata); loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import resnet18
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffusiondci.errors import UserInputError

WEIGHTS_NAME = "encoder.safetensors"
CONFIG_NAME = "encoder.json"
FORMAT_NAME = "diffusiondci.reference_encoder"
FORMAT_VERSION = 1

#: Channels of layer1..layer4 of a ResNet-18 at ``width=1``.
BASE_CHANNELS = (64, 128, 256, 512)
#: Smallest input side: five stride-2 steps (stem conv, max-pool, layer2..4) leave 1x1 at 32 px.
MIN_SIZE = 32


class ReferenceEncoder(nn.Module):
    """ResNet-18 reference encoder: ``N x 3 x H x W`` in [-1, 1] -> ``N x embed_dim`` embedding.

    Args:
        embed_dim: size of the appended fully connected layer (512 in the paper).
        width: channel multiplier of the ResNet stages (MONAI's ``widen_factor``); 1.0 is the
            standard ResNet-18 (64/128/256/512 channels), e.g. 0.25 gives a tiny CPU preset.
    """

    def __init__(self, embed_dim: int = 512, width: float = 1.0):
        super().__init__()
        if int(embed_dim) < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if not (width > 0 and int(BASE_CHANNELS[0] * width) >= 1):
            raise ValueError(f"width must be > 0 and leave at least one channel, got {width}")
        self.embed_dim = int(embed_dim)
        self.width = float(width)
        self.net = resnet18(
            pretrained=False,
            spatial_dims=2,
            n_input_channels=3,
            num_classes=self.embed_dim,
            widen_factor=self.width,
            conv1_t_size=7,
            conv1_t_stride=2,
            bias_downsample=False,
        )
        self.stage_channels: tuple[int, ...] = tuple(int(c * self.width) for c in BASE_CHANNELS)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as stored in the checkpoint's JSON."""
        return {"embed_dim": self.embed_dim, "width": self.width}

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"images must be at least {MIN_SIZE} px per side, got {tuple(x.shape[-2:])}")

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x)
        net = self.net
        h = net.act(net.bn1(net.conv1(x)))
        h = net.maxpool(h)
        maps = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            maps.append(h)
        return maps

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer4: ``N x C_k x H/2^(k+1) x W/2^(k+1)`` for k = 1..4.

        Used for LPIPS-style diversity and optionally as MCAA tokens.
        """
        return self._stages(x)

    def spatial_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage map before pooling, flattened to ``N x (h*w) x C`` (row-major tokens)."""
        return self._stages(x)[-1].flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled last stage through the appended FC layer: ``N x embed_dim``."""
        h = self._stages(x)[-1]
        return self.net.fc(self.net.avgpool(h).flatten(1))


def save_encoder(model: ReferenceEncoder, path_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` into ``path_dir`` (created if needed).

    ``meta`` must be JSON-serialisable (e.g. training settings); it comes back from
    :func:`load_encoder`. Returns the folder.
    """
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": model.config(),
        "meta": dict(meta or {}),
    }
    text = json.dumps(record, indent=2, sort_keys=True)  # fails before anything is written
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path_dir / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
    (path_dir / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
    return path_dir


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"cannot read encoder config ({exc}); re-save the encoder", path) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise UserInputError(f"not a reference-encoder config (expected format '{FORMAT_NAME}')", path)
    if record.get("version") != FORMAT_VERSION:
        raise UserInputError(
            f"unsupported encoder checkpoint version {record.get('version')!r} (expected {FORMAT_VERSION})", path
        )
    config, meta = record.get("config"), record.get("meta", {})
    if not isinstance(config, dict) or not isinstance(meta, dict):
        raise UserInputError("'config' and 'meta' must be JSON objects; re-save the encoder", path)
    unknown = sorted(set(config) - {"embed_dim", "width"})
    if unknown:
        raise UserInputError(f"unknown encoder config keys {unknown}; expected embed_dim, width", path)
    return config, meta


def load_encoder(path_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[ReferenceEncoder, dict]:
    """Rebuild a :class:`ReferenceEncoder` from a folder written by :func:`save_encoder`.

    Weights are read with safetensors only (no pickle). Returns ``(model, meta)`` with the model in
    eval mode. Raises :class:`UserInputError` when files are missing or unreadable, or when the
    weights do not match the config (listing missing, unexpected and mismatched-shape keys).
    """
    path_dir = Path(path_dir)
    config_path, weights_path = path_dir / CONFIG_NAME, path_dir / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise UserInputError(f"missing {p.name}; point to a folder written by save_encoder", p)
    config, meta = _read_config(config_path)
    try:
        model = ReferenceEncoder(**config)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"invalid encoder config ({exc})", config_path) from exc
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"not a readable safetensors file ({exc}); re-save the encoder", weights_path) from exc

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if mismatched:
            parts.append(f"mismatched shapes (file != config {config}) {mismatched}")
        raise UserInputError(
            "weights do not match encoder.json: " + "; ".join(parts) + "; use the matching encoder.json or re-save",
            weights_path,
        )
    model.load_state_dict(state)
    model.to(map_location).eval()
    return model, meta
