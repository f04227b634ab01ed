"""Tests for the ResNet-18 reference encoder and its SimCLR pre-training pieces."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusiondci.errors import UserInputError
from diffusiondci.models.embedding import embed_dataset
from diffusiondci.models.reference_encoder import ReferenceEncoder, load_encoder, save_encoder
from diffusiondci.train.simclr import (
    ProjectionHead,
    SimCLRAugment,
    nt_xent_loss,
    simclr_train_step,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size) * 2 - 1


def _textures(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Oriented sinusoidal gratings of distinct frequency/orientation plus a random colour cast."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = []
    for i in range(n):
        freq, theta = 0.08 + 0.5 * i / n, math.pi * i / n
        wave = torch.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        out.append((0.6 * wave + 0.4 * colour).clamp(-1, 1))
    return torch.stack(out)


# ---------------------------------------------------------------- encoder


@pytest.mark.parametrize("size", [64, 256])
def test_forward_and_feature_map_shapes(size):
    enc = ReferenceEncoder().eval()
    x = _images(2, size)
    with torch.no_grad():
        emb = enc(x)
        maps = enc.feature_maps(x)
        tokens = enc.spatial_tokens(x)
    assert emb.shape == (2, 512)
    assert len(maps) == 4
    for k, (m, c) in enumerate(zip(maps, (64, 128, 256, 512))):
        stride = 4 * 2**k  # standard ResNet-18: stem /4, then /2 per stage from layer2 on
        assert m.shape == (2, c, size // stride, size // stride)
    h = size // 32
    assert tokens.shape == (2, h * h, 512)
    # Tokens are the last map in row-major order.
    assert torch.equal(tokens[:, 1], maps[-1][:, :, 0, 1])
    assert torch.equal(tokens, maps[-1].flatten(2).transpose(1, 2))
    # The embedding is the appended FC applied to the spatial mean of the last map.
    assert torch.allclose(emb, enc.net.fc(tokens.mean(dim=1)), atol=1e-5)


def test_non_square_and_minimum_size():
    enc = ReferenceEncoder(width=0.25).eval()
    with torch.no_grad():
        assert enc(_images(1, 32)).shape == (1, 512)
        assert enc(torch.rand(1, 3, 32, 96) * 2 - 1).shape == (1, 512)
        with pytest.raises(ValueError):
            enc(_images(1, 16))
        with pytest.raises(ValueError):
            enc(torch.rand(1, 1, 64, 64))


def test_tiny_width_preset():
    enc = ReferenceEncoder(embed_dim=512, width=0.25).eval()
    with torch.no_grad():
        maps = enc.feature_maps(_images(1, 64))
    assert [m.shape[1] for m in maps] == [16, 32, 64, 128]
    assert enc(_images(1, 64)).shape == (1, 512)
    full = sum(p.numel() for p in ReferenceEncoder().parameters())
    tiny = sum(p.numel() for p in enc.parameters())
    assert tiny < full / 8
    # Full width is a ResNet-18 (11.2M conv/bn params) with a 512->512 FC instead of 512->1000.
    assert 11_000_000 < full < 11_500_000


# ---------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path):
    enc = ReferenceEncoder(width=0.25)
    # Move BN running stats off their defaults so the round trip checks buffers too.
    enc.train()
    with torch.no_grad():
        enc(_images(4, 64))
    enc.eval()
    meta = {"steps": 30, "temperature": 0.2, "note": "unit test"}
    save_encoder(enc, tmp_path / "enc", meta)
    loaded, meta2 = load_encoder(tmp_path / "enc")
    assert meta2 == meta
    assert loaded.config() == {"embed_dim": 512, "width": 0.25}
    assert not loaded.training
    x = _images(3, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), loaded(x))
        for a, b in zip(enc.feature_maps(x), loaded.feature_maps(x)):
            assert torch.equal(a, b)


def test_load_never_unpickles(tmp_path, monkeypatch):
    enc = ReferenceEncoder(width=0.25).eval()
    save_encoder(enc, tmp_path, {})

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded, _ = load_encoder(tmp_path)
    x = _images(1, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), loaded(x))


def test_pickle_file_in_place_of_weights_is_rejected(tmp_path):
    save_encoder(ReferenceEncoder(width=0.25), tmp_path, {})
    weights = tmp_path / "encoder.safetensors"

    class Boom:
        def __reduce__(self):  # would run if anything unpickled the file
            return (exec, ("raise SystemExit('unpickled!')",))

    weights.write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(UserInputError, match="safetensors"):
        load_encoder(tmp_path)


def test_wrong_shape_checkpoint_lists_keys(tmp_path):
    save_encoder(ReferenceEncoder(width=0.25), tmp_path, {})
    cfg_path = tmp_path / "encoder.json"
    record = json.loads(cfg_path.read_text())
    record["config"]["width"] = 0.5  # config now disagrees with the stored weights
    cfg_path.write_text(json.dumps(record))
    with pytest.raises(UserInputError) as err:
        load_encoder(tmp_path)
    msg = str(err.value)
    assert "mismatched shapes" in msg
    assert "net.conv1.weight (16, 3, 7, 7) != (32, 3, 7, 7)" in msg
    assert "net.layer4.1.conv2.weight" in msg
    assert "encoder.safetensors" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    save_encoder(ReferenceEncoder(width=0.25), tmp_path, {})
    weights = tmp_path / "encoder.safetensors"
    state = load_file(str(weights))
    del state["net.fc.bias"]
    state["net.extra.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(UserInputError) as err:
        load_encoder(tmp_path)
    msg = str(err.value)
    assert "missing keys ['net.fc.bias']" in msg
    assert "unexpected keys ['net.extra.weight']" in msg


def test_missing_files_raise_user_error(tmp_path):
    with pytest.raises(UserInputError, match="encoder.json"):
        load_encoder(tmp_path / "nowhere")
    save_encoder(ReferenceEncoder(width=0.25), tmp_path, {})
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(UserInputError, match="encoder config"):
        load_encoder(tmp_path)


# ---------------------------------------------------------------- SimCLR pieces


def _naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR eq. 1 with explicit loops over the 2N views (float64 Python math)."""
    z = [list(map(float, row)) for row in torch.cat([z1, z2]).double()]
    n2, n = len(z), len(z) // 2

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = 0.0
        for k in range(n2):
            if k != i:
                denom += math.exp(cos(z[i], z[k]) / t)
        total += -math.log(math.exp(cos(z[i], z[j]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_naive(temperature):
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    got = nt_xent_loss(z1, z2, temperature)
    assert got.ndim == 0
    assert math.isclose(float(got), _naive_nt_xent(z1, z2, temperature), rel_tol=1e-4)


def test_nt_xent_aligned_pairs_lower_than_random():
    z1 = torch.randn(16, 32)
    aligned = nt_xent_loss(z1, z1 + 0.01 * torch.randn(16, 32), 0.1)
    random = nt_xent_loss(z1, torch.randn(16, 32), 0.1)
    assert float(aligned) < float(random)
    # Perfectly aligned orthogonal embeddings approach the lower bound log(1 + (2N-2) e^{-1/T}).
    eye = torch.eye(4)
    assert math.isclose(float(nt_xent_loss(eye, eye, 0.1)), math.log(1 + 6 * math.exp(-10)), rel_tol=1e-3)


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError):
        nt_xent_loss(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError):
        nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=0.001)


def test_augment_views_range_shape_determinism():
    aug = SimCLRAugment(48, p_gray=0.2)
    x = _textures(4, 64)
    torch.manual_seed(123)
    v1, v2 = aug(x)
    torch.manual_seed(123)
    w1, w2 = aug(x)
    assert v1.shape == v2.shape == (4, 3, 48, 48)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.allclose(v1, v2)
    assert v1.min() >= -1 and v1.max() <= 1
    # With the random ops removed, the [-1, 1] <-> [0, 1] conversion is lossless.
    plain = SimCLRAugment(64, p_jitter=0.0, p_blur=0.0)
    plain.ops = torch.nn.Sequential(plain.ops[3])  # ColorJitter with p=0 only
    p1, _ = plain(x)
    assert torch.allclose(p1, x, atol=1e-5)


def test_projection_head_shape():
    assert ProjectionHead(512, 256, 128)(torch.randn(6, 512)).shape == (6, 128)


def test_simclr_steps_reduce_loss():
    torch.manual_seed(1)
    enc, head = ReferenceEncoder(width=0.25), ProjectionHead(512, 128, 64)
    aug = SimCLRAugment(64)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    x = _textures(8, 64, seed=1)
    losses = [simclr_train_step(enc, head, aug, x, opt, temperature=0.2) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1
    assert last < math.log(2 * 8 - 1)  # below the loss of uninformative (all-equal) embeddings


def test_embed_dataset_matches_batched_forward():
    enc = ReferenceEncoder(width=0.25)
    enc.train()
    x = _images(5, 64)
    got = embed_dataset(enc, x, batch_size=2)  # iterating a tensor yields 3 x H x W images
    assert enc.training  # mode restored
    enc.eval()
    with torch.no_grad():
        want = enc(x)
    assert got.shape == (5, 512) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)


def test_embed_dataset_uint8_and_mixed_sizes():
    enc = ReferenceEncoder(width=0.25).eval()
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    arrays.append(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))
    got = embed_dataset(enc, iter(arrays), batch_size=8)
    with torch.no_grad():
        for i, a in enumerate(arrays):
            t = torch.from_numpy(a).permute(2, 0, 1).float()[None] / 127.5 - 1
            assert torch.allclose(got[i], enc(t)[0], atol=1e-5)
    with pytest.raises(ValueError):
        embed_dataset(enc, [np.zeros((64, 64, 3), dtype=np.float32)])
