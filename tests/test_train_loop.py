"""Tests for the generic training loop, checkpoints and DDP helpers (CPU, seeded, fast)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from diffusiondci.errors import UserInputError
from diffusiondci.runs import checkpoint as run_ckpt
from diffusiondci.runs.weights import load_weights_safetensors
from diffusiondci.train import checkpoint as ckpt
from diffusiondci.train.data_order import ResumableSampler
from diffusiondci.train.loop import Trainer, TrainingDiverged

# ----------------------------------------------------------------------------- tiny problem


class TinyNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OtherNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)


def make_dataset(n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


class Killed(Exception):
    pass


def make_trainer(
    run_dir: Path,
    max_steps: int = 12,
    *,
    resume: bool = False,
    kill_at: int | None = None,
    nan_at: int | None = None,
    init_seed: int = 0,
    noise_seed: int = 7,
    config: dict | None = None,
    ckpt_every: int = 5,
    **kw,
) -> Trainer:
    torch.manual_seed(init_seed)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    noise = torch.Generator().manual_seed(noise_seed)

    def step_fn(m, batch, step):
        if kill_at is not None and step == kill_at:
            raise Killed()
        x, y = batch
        x = x + 0.1 * torch.randn(x.shape, generator=noise)  # registered generator stream
        scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())  # python + numpy
        mse = ((m(x) - y) ** 2).mean()  # dropout: torch global stream
        loss = mse * scale
        if nan_at is not None and step == nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "mse": mse.detach()}

    def val_fn(m, step):
        _ = torch.randn(3)  # must not disturb the training streams
        return {"score": float(sum(p.abs().sum() for p in m.parameters()))}

    return Trainer(
        run_dir,
        model,
        opt,
        make_dataset(),
        batch_size=3,
        step_fn=step_fn,
        max_steps=max_steps,
        seed=11,
        config=config if config is not None else {"lr": 1e-2, "model": {"width": 16}},
        scheduler=sched,
        ema_decay=0.9,
        ema_warmup=True,
        log_every=1,
        ckpt_every=ckpt_every,
        val_fn=val_fn,
        val_every=4,
        best_key="score",
        best_mode="min",
        generators={"noise": noise},
        resume=resume,
        progress=False,
        **kw,
    )


def _flat_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_flat_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_flat_equal(x, y) for x, y in zip(a, b))
    return a == b


def _read_log(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- resume


def test_kill_and_resume_is_bit_identical(tmp_path):
    ref = make_trainer(tmp_path / "ref")
    ref_metrics = ref.fit()
    assert ref_metrics["status"] == "completed" and ref_metrics["step"] == 12

    run = tmp_path / "run"
    with pytest.raises(Killed):  # checkpoint at step 5 (mid-epoch: 3 batches/epoch), killed at 7
        make_trainer(run, kill_at=7).fit()
    assert run_ckpt.load_checkpoint(run / "checkpoints" / "latest").train_state["step"] == 5
    # fresh objects with different init / generator seeds: everything must come from the checkpoint
    resumed = make_trainer(run, resume=True, init_seed=999, noise_seed=999)
    resumed.fit()

    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ref.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    assert _flat_equal(ref.optimizer.state_dict(), resumed.optimizer.state_dict())
    assert ref.scheduler.state_dict() == resumed.scheduler.state_dict()

    c_ref = run_ckpt.load_checkpoint(tmp_path / "ref" / "checkpoints" / "latest")
    c_res = run_ckpt.load_checkpoint(run / "checkpoints" / "latest")
    assert _flat_equal(c_ref.model_state, c_res.model_state)
    assert _flat_equal(c_ref.ema_state, c_res.ema_state)
    assert _flat_equal(c_ref.train_state["optimizer"], c_res.train_state["optimizer"])
    assert _flat_equal(c_ref.train_state["rng"], c_res.train_state["rng"])
    assert c_res.train_state["step"] == 12 and c_res.train_state["epoch"] == 4

    # the log of the killed tail (steps 6, 7) was replaced; losses match the uninterrupted run
    log_ref, log_res = _read_log(tmp_path / "ref" / "log.csv"), _read_log(run / "log.csv")
    assert [r["step"] for r in log_res] == [str(s) for s in range(1, 13)]
    assert [r["loss"] for r in log_ref] == [r["loss"] for r in log_res]
    assert "val_score" in log_res[0].keys() and log_res[3]["val_score"] != ""
    assert (run / "checkpoints" / "best" / "meta.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 12
    assert json.loads((run / "config.json").read_text()) == {"lr": 1e-2, "model": {"width": 16}}

    # control: the random streams really matter (otherwise the test above proves nothing)
    other = make_trainer(tmp_path / "other", noise_seed=8)
    other.fit()
    assert not all(torch.equal(a, b) for a, b in zip(ref.model.parameters(), other.model.parameters()))


def test_sampling_does_not_disturb_training_and_keep_last(tmp_path):
    plain = make_trainer(tmp_path / "plain")
    plain.fit()
    calls = []

    def sample_fn(m, step, out_dir):
        # draws from every stream; must not change the training trajectory
        _ = torch.randn(5), random.random(), np.random.rand()
        assert m is tr.ema_model and not m.training
        (out_dir / "x.txt").write_text(str(step))
        calls.append(step)

    tr = make_trainer(tmp_path / "sampled", ckpt_every=2, keep_last=2, sample_fn=sample_fn, sample_every=4)
    tr.fit()
    assert calls == [4, 8, 12]
    assert (tmp_path / "sampled" / "samples" / "step_8" / "x.txt").read_text() == "8"
    assert all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), tr.model.parameters()))
    kept = sorted(p.name for p in (tmp_path / "sampled" / "checkpoints").glob("step_*"))
    assert kept == ["step_10", "step_12"]
    assert run_ckpt.load_checkpoint(tmp_path / "sampled" / "checkpoints" / "step_10").train_state["step"] == 10


def test_sampler_shards_and_mid_epoch_restart():
    n, bs = 23, 3
    s0, s1 = (ResumableSampler(n, bs, seed=5, rank=r, world_size=2) for r in (0, 1))
    assert s0.batches_per_epoch == (n // 2) // bs == 3
    e0, e1 = s0.epoch_indices(4), s1.epoch_indices(4)
    assert len(e0) == len(e1) == 9 and not set(e0) & set(e1)  # disjoint shards
    assert s0.epoch_indices(4) != s0.epoch_indices(5)  # reshuffled each epoch
    assert s0.epoch_indices(4) == ResumableSampler(n, bs, seed=5, rank=0, world_size=2).epoch_indices(4)
    s0.set_epoch(4, start_batch=2)
    assert list(s0) == e0[6:] and len(s0) == 3
    full = ResumableSampler(12, 4, seed=0, shuffle=True)
    assert sorted(full.epoch_indices(0)) == list(range(12))
    with pytest.raises(UserInputError):
        ResumableSampler(5, 3, world_size=2)


def test_resume_with_different_config_errors(tmp_path):
    make_trainer(tmp_path, max_steps=2, ckpt_every=2).fit()
    with pytest.raises(UserInputError, match=r"model\.width: 16 -> 32"):
        make_trainer(tmp_path, resume=True, config={"lr": 1e-2, "model": {"width": 32}})
    with pytest.raises(UserInputError, match="--resume"):
        make_trainer(tmp_path)  # same folder without resume: refuse to overwrite


# ----------------------------------------------------------------------------- loss guard


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = make_trainer(tmp_path, nan_at=7)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: loss is nan") as info:
        tr.fit()
    assert isinstance(info.value, UserInputError) and "step 5" in str(info.value)
    good = run_ckpt.load_checkpoint(tmp_path / "checkpoints" / "latest")
    assert good.train_state["step"] == 5
    assert all(torch.isfinite(v).all() for v in good.model_state.values())
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())  # no step with a NaN loss
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


# ----------------------------------------------------------------------------- atomic writes


def _tiny_state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_failed_or_partial_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    ckpt.save_checkpoint(target, model_state=_tiny_state(1.0), train_state={"step": 1})

    real_save = torch.save

    def crash(obj, f, *a, **k):  # write half a file, then "crash"
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(target, model_state=_tiny_state(2.0), train_state={"step": 2})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    c = run_ckpt.load_checkpoint(target)
    assert c.train_state["step"] == 1 and torch.equal(c.model_state["w"], _tiny_state(1.0)["w"])
    assert not list(tmp_path.glob(".latest.tmp-*"))

    # crash between the two renames of the swap: only the ".old" copy exists -> recovered
    os.replace(target, tmp_path / ".latest.old-123-456")
    (tmp_path / ".latest.tmp-999-1").mkdir()  # an incomplete temp folder from the dead process
    assert run_ckpt.resolve_checkpoint(target) == target
    assert run_ckpt.load_checkpoint(target).train_state["step"] == 1

    # a corrupted file is detected by its hash
    data = bytearray((target / run_ckpt.MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (target / run_ckpt.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="corrupted"):
        run_ckpt.load_checkpoint(target)


def test_crash_during_trainer_save_then_resume(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ckpt.save_file

    def flaky(state, path, **kw):
        if ".latest.tmp-" in str(path) and path.endswith(run_ckpt.EMA_FILE):
            calls["n"] += 1
            if calls["n"] == 2:  # the second save of "latest" (step 10) dies half-way
                Path(path).write_bytes(b"garbage")
                raise OSError("killed mid-write")
        return real(state, path, **kw)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(OSError, match="killed mid-write"):
        make_trainer(tmp_path, max_steps=12).fit()
    monkeypatch.setattr(ckpt, "save_file", real)
    assert run_ckpt.load_checkpoint(tmp_path / "checkpoints" / "latest").train_state["step"] == 5
    tr = make_trainer(tmp_path, resume=True)
    assert tr.fit()["step"] == 12


# ----------------------------------------------------------------------------- safe loading


def test_checkpoints_load_without_pickle(tmp_path, monkeypatch):
    make_trainer(tmp_path, max_steps=3, ckpt_every=3).fit()
    latest = tmp_path / "checkpoints" / "latest"
    direct = torch.load(latest / run_ckpt.STATE_FILE, weights_only=True)
    assert direct["step"] == 3

    def forbidden(*a, **k):
        raise AssertionError("arbitrary unpickling attempted")

    real_load = torch.load

    def strict_load(*a, **k):
        assert k.get("weights_only") is True
        return real_load(*a, **k)

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(ckpt.torch, "load", strict_load)
    c = run_ckpt.load_checkpoint(latest)
    assert c.train_state["step"] == 3 and c.ema_state is not None
    assert set(c.train_state["rng"][0]) >= {"python", "numpy", "torch", "cuda", "generators"}


def test_load_weights_of_other_architecture_lists_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(ckpt.state_dict_for_saving(TinyNet(16)), str(path))
    model = TinyNet(16)
    load_weights_safetensors(model, path)
    assert torch.equal(model.net[0].weight, load_file(str(path))["net.0.weight"])

    with pytest.raises(UserInputError, match=r"7 shape mismatches \[.*net\.0\.weight: file \(16, 4\) vs model \(32, 4\)"):
        load_weights_safetensors(TinyNet(32), path)
    with pytest.raises(UserInputError) as info:
        load_weights_safetensors(OtherNet(), path)
    msg = str(info.value)
    assert "missing keys [body.bias, body.weight" in msg and "unexpected keys [net.0.bias" in msg
    assert str(path) in msg
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserInputError, match="safetensors"):
        load_weights_safetensors(TinyNet(16), bad)


# ----------------------------------------------------------------------------- DDP

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from torch.utils.data import TensorDataset
    from diffusiondci.train import distributed as D
    from diffusiondci.train.loop import Trainer

    run_dir, out_dir, max_steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.linspace(-1, 1, 36).reshape(12, 3)
    y = torch.stack([x.sum(1), x[:, 0] - x[:, 2]], 1)
    ds = TensorDataset(x, y, torch.arange(12))
    seen = []

    def step_fn(m, batch, step):
        xb, yb, idx = batch
        seen.append(idx.tolist())
        return {"loss": ((m(xb) - yb) ** 2).mean()}

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tr = Trainer(run_dir, model, opt, ds, batch_size=2, step_fn=step_fn, max_steps=max_steps, seed=3,
                 log_every=1, ckpt_every=2, resume=resume, config={"task": "ddp"}, progress=False, device="cpu")
    tr.fit()
    r = tr.dist.rank
    assert tr.dist.world_size == 2
    save_file({k: v.contiguous() for k, v in tr.model.state_dict().items()}, f"{out_dir}/rank{r}_{max_steps}.safetensors")
    json.dump(seen, open(f"{out_dir}/seen{r}_{max_steps}.json", "w"))
    D.cleanup()
    """
)


def _torchrun(script: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc_per_node=2 on a one-GPU machine: rank 1 must say why, not hang or crash in CUDA."""
    from diffusiondci.train import distributed as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail("set_device reached"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserInputError, match=r"cuda:1 asked for \(LOCAL_RANK=1\) but only 1 CUDA GPU"):
        D.init_distributed()
    with pytest.raises(UserInputError, match="--nproc_per_node"):
        D.init_distributed("cuda")  # an index-less --device takes LOCAL_RANK too
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserInputError, match="cuda:3 asked for"):
        D.init_distributed("cuda:3")


def test_ddp_two_processes_gloo_matches_single_process(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    _torchrun(script, str(run), str(out), "2", "0")
    _torchrun(script, str(run), str(out), "4", "1")  # every rank resumes from rank 0's checkpoint

    w0, w1 = load_file(str(out / "rank0_4.safetensors")), load_file(str(out / "rank1_4.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert run_ckpt.load_checkpoint(run / "checkpoints" / "latest").train_state["step"] == 4
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # rank 0 only, one per launch
    assert [r["step"] for r in _read_log(run / "log.csv")] == ["1", "2", "3", "4"]

    seen = [json.loads((out / f"seen{r}_{s}.json").read_text()) for r in (0, 1) for s in (2, 4)]
    steps0, steps1 = seen[0] + seen[1], seen[2] + seen[3]
    assert len(steps0) == len(steps1) == 4
    epoch0 = sum(steps0[:3], []) + sum(steps1[:3], [])
    assert sorted(epoch0) == list(range(12))  # the two shards cover the epoch without overlap

    # independent single-process reference: SGD+momentum on the concatenated global batches
    torch.manual_seed(0)
    ref = nn.Linear(3, 2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x = torch.linspace(-1, 1, 36).reshape(12, 3)
    y = torch.stack([x.sum(1), x[:, 0] - x[:, 2]], 1)
    for a, b in zip(steps0, steps1):
        idx = torch.tensor(a + b)
        opt.zero_grad()
        ((ref(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()
    assert torch.allclose(w0["weight"], ref.weight, atol=1e-6)
    assert torch.allclose(w0["bias"], ref.bias, atol=1e-6)
    assert not torch.allclose(w0["weight"], nn.Linear(3, 2).weight)  # it actually trained
