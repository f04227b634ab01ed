"""``diffusiondci train-encoder``: the SimCLR reference encoder (paper §IV-B2a) as a run folder.

The run folder holds the generic training outputs (:mod:`.loop`), the encoder itself under
``encoder/`` (safetensors + JSON) and the embedding cache ``embeddings.safetensors`` (one 512-d
vector per patch of the dataset, all splits, rows in ``embeddings.json`` order).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.patch_dataset import PatchDataset
from ..errors import UserInputError
from ..models.embedding import embed_dataset
from ..models.reference_encoder import ReferenceEncoder, load_encoder, save_encoder
from ..runs.weights import unwrap_model
from .loop import Trainer
from .run_config import preflight_run_folder
from .simclr import ProjectionHead, SimCLRAugment, nt_xent_loss

ENCODER_DIR = "encoder"
EMBEDDINGS = "embeddings.safetensors"


@dataclass
class EncoderConfig:
    width: float = 1.0
    embed_dim: int = 512
    projection_dim: int = 128
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-6
    steps: int = 20000
    temperature: float = 0.1
    crop_scale_min: float = 0.2
    log_every: int = 50
    ckpt_every: int = 1000
    seed: int = 0
    use_unlabelled: bool = True  # SimCLR needs no labels: unlabelled training patches count too

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"encoder.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserInputError(f"encoder.lr must be > 0, got {self.lr}")


class SimCLRModel(nn.Module):
    """Encoder + projection head; only the encoder is kept after training."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.encoder = ReferenceEncoder(embed_dim=cfg.embed_dim, width=cfg.width)
        self.head = ProjectionHead(cfg.embed_dim, cfg.embed_dim, cfg.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def train_encoder(data: str | Path, run_dir: str | Path, cfg: EncoderConfig, resume: bool = False,
                  progress: bool = True, device: str | torch.device | None = None) -> Path:
    """SimCLR training of the reference encoder on ``data`` into ``run_dir``; ``device`` as in
    ``train-dsdm`` (default: cuda if available; torchrun picks one GPU per process)."""
    run_dir = Path(run_dir)
    preflight_run_folder(run_dir, "encoder", resume)  # a wrong --out / --resume fails before any work
    # no labels are used: unlabelled patches of the training split count too (unless turned off)
    dataset = PatchDataset(data, splits=("train",), with_masks=False, labelled_only=not cfg.use_unlabelled)
    if len(dataset) < 2:
        raise UserInputError("SimCLR needs at least 2 training patches", data)
    batch_size = min(cfg.batch_size, len(dataset))
    image_size = dataset[0]["image"].shape[-1]
    torch.manual_seed(cfg.seed)
    model = SimCLRModel(cfg)
    augment = SimCLRAugment(image_size, scale=(cfg.crop_scale_min, 1.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step_fn(m: nn.Module, batch: dict, step: int) -> dict:
        v1, v2 = augment(batch["image"])
        z = m(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent_loss(z1, z2, cfg.temperature)}

    trainer = Trainer(
        run_dir, model, optimizer, dataset, batch_size, step_fn, cfg.steps, seed=cfg.seed,
        # ``steps`` is left out so that a finished run can be extended with --resume --steps N
        config={"stage": "encoder", "data": str(Path(data).resolve()),
                **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"}},
        log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, resume=resume, progress=progress, device=device,
    )
    trainer.fit()
    if trainer.is_main:
        encoder = unwrap_model(trainer.model).encoder.eval()
        save_encoder(encoder, run_dir / ENCODER_DIR, {"data": str(Path(data).resolve()), "steps": cfg.steps,
                                                      "image_size": image_size})
        write_embeddings(encoder, data, run_dir)
    return run_dir


def write_embeddings(encoder: ReferenceEncoder, data: str | Path, run_dir: Path) -> None:
    """Embedding cache of every patch in the dataset (all splits, labelled or not)."""
    every = PatchDataset(data, splits=None, with_masks=False, labelled_only=False, cache=False)
    emb = embed_dataset(encoder, (every[i]["image"] for i in range(len(every))), batch_size=64)
    save_file({"embeddings": emb.contiguous()}, str(run_dir / EMBEDDINGS))
    (run_dir / "embeddings.json").write_text(json.dumps({"ids": every.ids}))


def load_encoder_run(run_dir: str | Path) -> tuple[ReferenceEncoder, dict]:
    run_dir = Path(run_dir)
    if not (run_dir / ENCODER_DIR).is_dir():
        raise UserInputError("not an encoder run (no encoder/ folder); run `diffusiondci train-encoder`", run_dir)
    return load_encoder(run_dir / ENCODER_DIR)


def load_embeddings(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{patch id: embedding}`` from an encoder run's cache."""
    run_dir = Path(run_dir)
    try:
        emb = load_file(str(run_dir / EMBEDDINGS))["embeddings"]
        ids = json.loads((run_dir / "embeddings.json").read_text())["ids"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise UserInputError(f"embedding cache missing or damaged ({exc}); re-run train-encoder", run_dir) from exc
    return dict(zip(ids, emb))
