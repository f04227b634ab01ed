"""The `train-dsdm` stage: config presets, the training loss, overfitting, exact resume, DDP, run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusiondci.config import build, load_section
from diffusiondci.data.patch_dataset import PatchDataset
from diffusiondci.diffusion.losses import hybrid_loss
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.errors import UserInputError
from diffusiondci.models.conditions import mask_one_hot
from diffusiondci.models.unet import DSDMUNet
from diffusiondci.train.dsdm import DSDMConfig, build_unet_config, dsdm_loss, train_dsdm

# A smaller network than the tiny preset (same 64 px data) so that CPU tests stay fast.
MICRO = dict(channels=[16, 32, 32], attention_levels=[False, False, True], num_head_channels=16,
             norm_num_groups=8, spade_hidden_channels=16, ref_tokens=4)


def build_inputs(base: Path) -> dict[str, Path]:
    """Dataset (phantom sample -> `prepare` at the tiny preset) and a 2-step encoder run, built once
    per pytest session and shared with tests/test_sample.py."""
    from diffusiondci.data.phantom import write_sample
    from diffusiondci.data.prepare import PrepareConfig, prepare_dataset
    from diffusiondci.train.encoder import EncoderConfig, train_encoder

    data, enc = base / "ds", base / "enc"
    if not (enc / "embeddings.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        write_sample(base / "sample", seed=1, size=(384, 384), tile_size=128)  # small slides: 27 patches
        cfg = build(PrepareConfig, load_section("tiny", "prepare"), tile_size=128)
        prepare_dataset(base / "sample" / "slides", data, cfg,
                        groups_csv=base / "sample" / "slides" / "groups.csv", log=lambda m: None)
        train_encoder(data, enc, build(EncoderConfig, load_section("tiny", "encoder"), steps=2), progress=False)
    return {"data": data, "encoder": enc}


def micro_config(**kw) -> DSDMConfig:
    # constant LR: several tests extend a run (--resume with more steps), which re-plans a decaying LR
    base = dict(unet_overrides=MICRO, batch_size=4, steps=2, ema_decay=0.9, log_every=1, ckpt_every=2,
                sample_every=0, lr_schedule="constant", lr_warmup=0)
    base.update(kw)
    return build(DSDMConfig, load_section("tiny", "dsdm"), **base)


def train_micro_run(base: Path, inputs: dict[str, Path], name: str, **kw) -> Path:
    """A trained micro run, cached per session (name identifies the settings)."""
    run = base / name
    if not (run / "checkpoints" / "latest" / "meta.json").is_file():
        enc = None if kw.get("use_reference") is False else inputs["encoder"]
        train_dsdm(inputs["data"], run, micro_config(**kw), encoder_run=enc, progress=False)
    return run


def conditional_run(base: Path, inputs: dict[str, Path]) -> Path:
    """Mask + reference DSDM, 2 steps, with periodic samples at step 2 (shared with test_sample.py)."""
    return train_micro_run(base, inputs, "run_full_cond", sample_every=2, sample_steps=2, sample_count=2)


def unconditional_run(base: Path, inputs: dict[str, Path]) -> Path:
    """The ablation baseline: GroupNorm decoder, no reference (no encoder needed)."""
    return train_micro_run(base, inputs, "run_uncond", decoder_norm="group", use_reference=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.getbasetemp() / "dsdm_shared")


@pytest.fixture(scope="module")
def batch(inputs):
    ds = PatchDataset(inputs["data"])
    items = [ds[i] for i in range(4)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])


def test_presets_and_network_shapes():
    tiny = build(DSDMConfig, load_section("tiny", "dsdm"))
    paper = build(DSDMConfig, load_section("paper", "dsdm"))
    # paper §V-A2: Adam lr 1e-4, batch 10, 50 000 iterations, cosine schedule; eq. 14: lambda = 0.001
    assert (paper.lr, paper.batch_size, paper.steps, paper.noise_schedule) == (1e-4, 10, 50000, "cosine")
    assert (paper.lambda_vlb, paper.num_timesteps, paper.ema_decay) == (0.001, 1000, 0.9999)
    paper_net = build_unet_config(paper, image_size=256, ref_dim=512)
    assert paper_net.image_size == 256 and paper_net.num_decoder_blocks == 18  # taps {6-10} as in SDM
    # ablations: GroupNorm decoder / no MCAA
    ablated = build_unet_config(build(DSDMConfig, load_section("tiny", "dsdm"), decoder_norm="group",
                                      use_reference=False), image_size=64)
    assert ablated.decoder_norm == "group" and not ablated.use_reference

    net = DSDMUNet(build_unet_config(tiny, image_size=64, ref_dim=512))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x, torch.tensor([3, 900]), mask=torch.randint(0, 3, (2, 64, 64)), ref=torch.randn(2, 512))
    assert out.shape == (2, 6, 64, 64)  # eps + learned-variance channels

    with pytest.raises(UserInputError, match="unknown UNetConfig keys"):
        build_unet_config(micro_config(unet_overrides={"chanels": [8, 8]}))
    with pytest.raises(UserInputError, match="sum to at most 1"):
        micro_config(p_drop_mask=0.6, p_drop_ref=0.6)
    with pytest.raises(UserInputError, match="unet"):
        micro_config(unet="huge")


def test_condition_dropout_uses_the_models_null_conditions(batch):
    """Dropping the mask / the reference in the loss equals calling the network with mask=None /
    ref=None (the network's own NULL conditions, eq. 17), computed here independently."""
    torch.manual_seed(0)
    net = DSDMUNet(build_unet_config(micro_config(), image_size=64, ref_dim=512))
    with torch.no_grad():  # move away from the zero-initialised layers so every condition matters
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DiffusionSchedule(1000)
    x0, mask = batch
    ref = torch.randn(4, 512)
    t = torch.tensor([0, 10, 500, 990])
    noise = torch.randn_like(x0)
    x_t = sched.q_sample(x0, t, noise)

    def reference(m, r):
        return hybrid_loss(sched, net(x_t, t, mask=m, ref=r), x0, x_t, t, noise, reduction="mean")["loss"]

    with torch.no_grad():
        full, no_mask, no_ref, neither = (
            dsdm_loss(net, sched, x0, mask, ref, t, noise, p_drop=p)["loss"]
            for p in ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        )
        assert torch.allclose(full, reference(mask_one_hot(mask), ref))
        assert torch.allclose(no_mask, reference(None, ref))
        assert torch.allclose(no_ref, reference(mask_one_hot(mask), None))
        assert torch.allclose(neither, reference(None, None))
        values = [float(v) for v in (full, no_mask, no_ref, neither)]
        assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-4, values


def test_micro_model_overfits_one_batch(batch):
    torch.manual_seed(0)
    net = DSDMUNet(build_unet_config(micro_config(), image_size=64, ref_dim=512))
    sched = DiffusionSchedule(1000)
    x0, mask = batch
    ref = torch.randn(4, 512)
    t = torch.tensor([50, 200, 400, 700])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = dsdm_loss(net, sched, x0, mask, ref, t, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # zero-initialised output: eps_theta = 0 at start, so L_simple starts at E[eps^2] ~ 1
    assert 0.8 < losses[0] < 1.3
    assert losses[-1] <= losses[0] / 5, losses[::10]


def test_run_folder_is_self_contained(inputs, tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    run = conditional_run(base, inputs)
    record = json.loads((run / "dsdm.json").read_text())
    data_meta = json.loads((inputs["data"] / "dataset.json").read_text())
    assert record["data"]["color_norm"] == data_meta["color_norm"]  # colour target travels with the model
    assert record["data"]["patch_size"] == 64 and record["unet"]["image_size"] == 64
    assert record["schedule"] == {"num_timesteps": 1000, "noise_schedule": "cosine"}
    a = load_file(str(run / "encoder" / "encoder.safetensors"))
    b = load_file(str(inputs["encoder"] / "encoder" / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    latest = run / "checkpoints" / "latest"
    assert (latest / "ema.safetensors").is_file()
    assert json.loads((latest / "meta.json").read_text())["step"] == 2
    log = (run / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,loss") and "mse" in log[0] and "vlb" in log[0] and len(log) == 3
    assert (run / "samples" / "step_2" / "samples.png").is_file()  # periodic DDIM samples (EMA weights)


def test_reference_model_needs_an_encoder(inputs, tmp_path):
    with pytest.raises(UserInputError, match="--encoder"):
        train_dsdm(inputs["data"], tmp_path / "r", micro_config(), encoder_run=None, progress=False)


def test_resume_matches_uninterrupted(inputs, tmp_path):
    kw = dict(steps=4, ckpt_every=2, sample_every=0)  # 9 training patches, batch 4: crosses an epoch
    full = train_dsdm(inputs["data"], tmp_path / "full", micro_config(**kw), encoder_run=inputs["encoder"],
                      progress=False, device="cpu")
    part = train_dsdm(inputs["data"], tmp_path / "part", micro_config(**{**kw, "steps": 2}),
                      encoder_run=inputs["encoder"], progress=False, device="cpu")
    train_dsdm(inputs["data"], part, micro_config(**kw), encoder_run=inputs["encoder"], resume=True, progress=False,
               device="cpu")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(full / "checkpoints" / "latest" / name))
        b = load_file(str(part / "checkpoints" / "latest" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # a different setting cannot resume the run
    with pytest.raises(UserInputError, match="configuration differs"):
        train_dsdm(inputs["data"], part, micro_config(**{**kw, "lr": 5e-4}), encoder_run=inputs["encoder"],
                   resume=True, progress=False, device="cpu")


def test_wrong_checkpoint_rejected(inputs, tmp_path_factory, tmp_path):
    from diffusiondci.diffusion.dsdm_run import load_dsdm

    base = tmp_path_factory.getbasetemp() / "dsdm_shared"
    cond, uncond = conditional_run(base, inputs), unconditional_run(base, inputs)
    assert not (uncond / "encoder").exists()  # the baseline needs no encoder
    model, _, info = load_dsdm(uncond, device="cpu")
    assert model.config.decoder_norm == "group" and info.encoder is None
    # the unconditional baseline's weights put into the conditional run's folder
    shutil.copytree(cond, tmp_path / "mixed")
    shutil.copytree(uncond / "checkpoints" / "latest", tmp_path / "mixed" / "checkpoints" / "other")
    with pytest.raises(UserInputError) as err:
        load_dsdm(tmp_path / "mixed", checkpoint="other", device="cpu")
    msg = str(err.value)
    assert "missing keys [" in msg and "unexpected keys [" in msg and "decoder_blocks." in msg
    assert str(tmp_path / "mixed" / "checkpoints" / "other") in msg
    with pytest.raises(UserInputError, match="not a DSDM run"):
        load_dsdm(inputs["encoder"], device="cpu")


DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    from diffusiondci.train import distributed as D
    from diffusiondci.train.dsdm import DSDMConfig, train_dsdm
    data, enc, run = sys.argv[1:4]
    micro = dict(channels=[16, 32, 32], attention_levels=[False, False, True], num_head_channels=16,
                 norm_num_groups=8, spade_hidden_channels=16, ref_tokens=4)
    cfg = DSDMConfig(unet="tiny", unet_overrides=micro, batch_size=2, steps=2, ema_decay=0.9, log_every=1,
                     ckpt_every=2)
    train_dsdm(data, run, cfg, encoder_run=enc, progress=False, device="cpu")
    D.cleanup()
    """
)


def test_ddp_two_processes(inputs, tmp_path):
    script = tmp_path / "ddp_dsdm.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "ddp_run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(inputs["data"]), str(inputs["encoder"]), str(run)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["step"] == 2
    assert (run / "dsdm.json").is_file() and (run / "encoder" / "encoder.safetensors").is_file()
    state = torch.load(run / "checkpoints" / "latest" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_killed_run_resumes_bit_exact_with_lr_decay_and_augmentation(inputs, tmp_path, monkeypatch):
    """Same planned steps, killed after the step-2 checkpoint: the cosine LR, the dihedral draws and
    min-SNR weights continue exactly (the part run is interrupted, not shortened)."""
    import diffusiondci.train.dsdm as dsdm_mod

    kw = dict(steps=4, ckpt_every=2, sample_every=0, lr_schedule="cosine", lr_warmup=1, lr_min_ratio=0.1,
              augment="dihedral", loss_weighting="min_snr", autocast="fp32")
    full = train_dsdm(inputs["data"], tmp_path / "full", micro_config(**kw), encoder_run=inputs["encoder"],
                      progress=False, device="cpu")
    real_loss, calls = dsdm_mod.dsdm_loss, {"n": 0}

    def killed_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(dsdm_mod, "dsdm_loss", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_dsdm(inputs["data"], tmp_path / "part", micro_config(**kw), encoder_run=inputs["encoder"],
                   progress=False, device="cpu")
    monkeypatch.setattr(dsdm_mod, "dsdm_loss", real_loss)
    train_dsdm(inputs["data"], tmp_path / "part", micro_config(**kw), encoder_run=inputs["encoder"], resume=True,
               progress=False, device="cpu")
    a = load_file(str(full / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "latest" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
