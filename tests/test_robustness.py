"""Damaged runs and malformed input (issue 15, items 1, 2, 5-8; issue 16, item 3): one-line errors
that name the file or the flag, exit status 2, nothing written or overwritten; line-based progress in
logs; help texts; one default preset.

Run folders here are made by hand (a ``config.json`` and a checkpoint written by the toolkit's own
writer, then damaged), so every case fails the way a user's would, in well under a second each.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from diffusiondci.cli import app, main
from diffusiondci.config import build, load_preset, load_section
from diffusiondci.errors import UserInputError
from diffusiondci.runs import checkpoint as run_ckpt
from diffusiondci.runs.formats import DSDM_FORMAT, DSDM_META
from diffusiondci.segmentation.model import SEG_FORMAT, SEG_META
from diffusiondci.train import checkpoint as ckpt
from diffusiondci.train.loop import Trainer
from tests.test_dsdm import MICRO

STAGES = {"encoder": "train-encoder", "dsdm": "train-dsdm", "seg": "train-seg"}
#: what each training command needs besides the data and --out to get as far as the run folder
EXTRA = {"train-encoder": [], "train-dsdm": ["--no-reference"], "train-seg": ["--injection", "none", "--init", "scratch"]}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny real dataset: 12 imported 32 px patches with masks."""
    from diffusiondci.data.import_patches import import_patches

    root = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / "src" / sub).mkdir(parents=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "src" / "images" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)).save(root / "src" / "masks" / f"p{i}.png")
    data = import_patches(root / "src", root / "ds", log=lambda m: None)
    return {"data": data}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: contents hash and modification time."""
    out: dict[str, tuple] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``diffusiondci ARGS`` in this process, through ``main`` (what the console script runs)."""
    monkeypatch.setattr(sys, "argv", ["diffusiondci", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def error_line(err: str) -> str:
    """The one non-warning line of stderr; fails if the error is not exactly one line."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def write_checkpoint(folder: Path, step: int = 3) -> Path:
    """A complete checkpoint written by the toolkit's atomic writer."""
    return ckpt.save_checkpoint(folder, model_state={"w": torch.arange(64, dtype=torch.float32)},
                                ema_state={"w": torch.zeros(64)}, train_state={"step": step, "epoch": 0},
                                meta={"step": step})


def damage(folder: Path, how: str, name: str = run_ckpt.MODEL_FILE) -> Path:
    f = folder / name
    data = bytearray(f.read_bytes())
    if how == "truncated":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:  # altered, same size: only the SHA-256 tells
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    return f


def fake_run(root: Path, stage: str) -> Path:
    """A run folder of kind ``stage`` with one complete checkpoint (``checkpoints/latest``)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"stage": stage}))
    write_checkpoint(root / "checkpoints" / "latest")
    return root


def fake_seg_run(root: Path, step: int = 3) -> Path:
    root.mkdir(parents=True)
    (root / SEG_META).write_text(json.dumps({"format": SEG_FORMAT}))
    write_checkpoint(root / "checkpoints" / "best", step)
    write_checkpoint(root / "checkpoints" / "latest", step)
    return root


def slide_png(path: Path) -> Path:
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(path)
    return path


def evil_train_state(folder: Path, marker: Path) -> None:
    """Replace ``train_state.pt`` by a pickle that would create ``marker`` when unpickled, with
    ``meta.json`` updated to match (so only the safe loader stands in the way)."""

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    state = folder / run_ckpt.STATE_FILE
    torch.save({"step": 3, "payload": Payload()}, state)
    meta = json.loads((folder / run_ckpt.META_FILE).read_text())
    meta["files"][run_ckpt.STATE_FILE] = {"sha256": run_ckpt.sha256_file(state), "bytes": state.stat().st_size}
    (folder / run_ckpt.META_FILE).write_text(json.dumps(meta))


def tiny_trainer(run_dir: Path, resume: bool = False, max_steps: int = 4, **kw) -> Trainer:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 1))

    def step_fn(m, batch, step):
        x, y = batch
        return {"loss": ((m(x) - y) ** 2).mean()}

    return Trainer(run_dir, model, torch.optim.SGD(model.parameters(), lr=0.1), data, 2, step_fn, max_steps,
                   config={"stage": "test"}, ckpt_every=2, log_every=1, resume=resume, progress=False, **kw)


# ----------------------------------------------------------------------------- item 1: damaged checkpoints


@pytest.mark.parametrize("stage", ["encoder", "dsdm", "seg"])
@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_damaged_checkpoint_stops_each_trainer(inputs, tmp_path, monkeypatch, capsys, stage, how):
    run = fake_run(tmp_path / "run", stage)
    bad = damage(run / "checkpoints" / "latest", how)
    before = snapshot(run)
    code, _, err = run_cli(monkeypatch, capsys, STAGES[stage], inputs["data"], "--out", run, "--preset", "tiny",
                           "--resume", *EXTRA[STAGES[stage]])
    line = error_line(err)
    assert code == 2
    assert str(bad) in line and "damaged checkpoint" in line
    assert ("truncated" if how == "truncated" else "SHA-256") in line
    assert "no checkpoint to resume" not in err and "step 0" not in err
    assert snapshot(run) == before  # nothing written, nothing retrained


def test_trainer_itself_refuses_a_damaged_latest(tmp_path):
    tiny_trainer(tmp_path / "run").fit()
    latest = tmp_path / "run" / "checkpoints" / "latest"
    damage(latest, "truncated", run_ckpt.STATE_FILE)
    before = snapshot(tmp_path / "run")
    with pytest.raises(UserInputError, match=r"train_state\.pt: damaged checkpoint: truncated"):
        tiny_trainer(tmp_path / "run", resume=True, max_steps=6)
    assert snapshot(tmp_path / "run") == before


def test_run_stopped_before_its_first_checkpoint_starts_over(tmp_path):
    """Not damage: a run with config.json and no checkpoint yet restarts (with a warning)."""
    tiny_trainer(tmp_path / "run")  # config.json written, killed before any step
    with pytest.warns(UserWarning, match="before its first checkpoint"):
        assert tiny_trainer(tmp_path / "run", resume=True).fit()["step"] == 4


@pytest.mark.parametrize("how", ["truncated", "altered"])
def test_segment_refuses_a_damaged_checkpoint(tmp_path, monkeypatch, capsys, how):
    run = fake_seg_run(tmp_path / "seg")
    bad = damage(run / "checkpoints" / "best", how)
    before = snapshot(run)
    code, _, err = run_cli(monkeypatch, capsys, "segment", slide_png(tmp_path / "s.png"), "--model", run,
                           "--out", tmp_path / "out", "--device", "cpu")
    line = error_line(err)
    assert code == 2 and str(bad) in line and "damaged checkpoint" in line
    assert "train (or resume) it first" not in line
    assert not (tmp_path / "out").exists() and snapshot(run) == before


def test_sample_refuses_a_damaged_checkpoint(tmp_path):
    from diffusiondci.diffusion.dsdm_run import load_dsdm

    run = tmp_path / "dsdm"
    run.mkdir()
    (run / DSDM_META).write_text(json.dumps({"format": DSDM_FORMAT, "unet": {}, "schedule": {}}))
    write_checkpoint(run / "checkpoints" / "latest")
    bad = damage(run / "checkpoints" / "latest", "truncated")
    with pytest.raises(UserInputError, match="damaged checkpoint: truncated") as info:
        load_dsdm(run, device="cpu")
    assert str(bad) in str(info.value)


def test_resume_without_a_run_is_an_error(inputs, tmp_path, monkeypatch, capsys):
    for stage in STAGES:
        out = tmp_path / f"nothing_{stage}"
        code, _, err = run_cli(monkeypatch, capsys, STAGES[stage], inputs["data"], "--out", out, "--preset", "tiny",
                               "--resume", *EXTRA[STAGES[stage]])
        assert code == 2 and "no run to resume here" in error_line(err)
        assert not out.exists()


# ----------------------------------------------------------------------------- item 6: pickle payloads


def test_pickle_payload_is_refused_in_one_line(tmp_path, monkeypatch, capsys, inputs):
    marker = tmp_path / "PWNED"
    run = fake_run(tmp_path / "run", "encoder")
    evil_train_state(run / "checkpoints" / "latest", marker)
    with pytest.raises(UserInputError) as info:
        run_ckpt.load_checkpoint(run / "checkpoints" / "latest")
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message and run_ckpt.STATE_FILE in message
    assert "refused" in message and not marker.exists()
    # the same through train-encoder --resume (meta.json matches the file: only the safe loader stops it)
    code, _, err = run_cli(monkeypatch, capsys, "train-encoder", inputs["data"], "--out", run, "--preset", "tiny",
                           "--resume", "--device", "cpu")
    line = error_line(err)
    assert code == 2 and "weights_only" not in err and "refused" in line and not marker.exists()


# ----------------------------------------------------------------------------- item 2: --out


def test_out_on_a_dataset_or_another_folder_is_refused(inputs, tmp_path, monkeypatch, capsys):
    data = inputs["data"]
    before = snapshot(data)
    for command in STAGES.values():
        code, _, err = run_cli(monkeypatch, capsys, command, data, "--out", data, "--preset", "tiny", *EXTRA[command])
        assert code == 2 and "holds a patch dataset (dataset.json)" in error_line(err)
    assert snapshot(data) == before

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "train-seg", data, "--out", other, "--preset", "tiny")
    assert code == 2 and "holds 1 other file (todo.txt)" in error_line(err)
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]

    dsdm_like = fake_run(tmp_path / "dsdm_run", "dsdm")
    code, _, err = run_cli(monkeypatch, capsys, "train-seg", data, "--out", dsdm_like, "--preset", "tiny", "--resume")
    assert code == 2 and "holds a train-dsdm run, not a train-seg run" in error_line(err)


# ----------------------------------------------------------------------------- item 5: --steps 0


def test_steps_zero_is_refused(inputs, tmp_path, monkeypatch, capsys):
    for command in STAGES.values():
        out = tmp_path / command
        code, _, err = run_cli(monkeypatch, capsys, command, inputs["data"], "--out", out, "--preset", "tiny",
                               "--steps", "0")
        assert code == 2 and error_line(err) == "error: --steps must be at least 1, got 0"
        assert not out.exists()
    with pytest.raises(UserInputError, match="at least 1"):
        tiny_trainer(tmp_path / "zero", max_steps=0)
    assert not (tmp_path / "zero").exists()


def test_untrained_run_is_not_used(tmp_path):
    from diffusiondci.segmentation.run import load_segmenter

    run = fake_seg_run(tmp_path / "seg", step=0)  # what `--steps 0` made before
    with pytest.raises(UserInputError, match="never trained"):
        load_segmenter(run, device="cpu")


# ----------------------------------------------------------------------------- item 6: flags, warnings


def test_errors_name_the_flag_the_value_came_from(inputs, tmp_path, monkeypatch, capsys):
    data, out = inputs["data"], tmp_path / "out"
    cases = [
        (["train-dsdm", "--lr", "0"], "error: --lr must be greater than 0, got 0.0"),
        (["train-encoder", "--lr", "-1"], "error: --lr must be greater than 0, got -1.0"),
        (["train-seg", "--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
        (["train-seg", "--injection", "bogus"], "error: --injection must be one of"),
        (["train-seg", "--label-unit", "slides"], "error: --label-unit must be one of"),
    ]
    for (command, *flags), expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, command, data, "--out", out, "--preset", "tiny", *flags)
        line = error_line(err)
        assert code == 2 and expected in line, line
        assert "seg.injection" not in line and "max_steps" not in line
    # a value from the preset file keeps the key's name
    values = load_preset("tiny")
    values["seg"]["steps"] = 0
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(values))
    code, _, err = run_cli(monkeypatch, capsys, "train-seg", data, "--out", out, "--preset", preset)
    assert code == 2 and "seg.steps" in error_line(err)
    assert not out.exists()


def test_warnings_are_one_line_each_and_once(capsys):
    from diffusiondci.cli.common import _one_line_warnings

    with _one_line_warnings():
        for _ in range(2):
            warnings.warn("slide.tif: 16-bit slide\n  rescaled to 8 bit", UserWarning, stacklevel=1)
        warnings.warn("slide.tif: 16-bit slide rescaled to 8 bit", UserWarning, stacklevel=1)  # another line
    err = capsys.readouterr().err
    assert err == "warning: slide.tif: 16-bit slide rescaled to 8 bit\n"


def test_cli_routes_warnings_through_one_formatter(tmp_path, monkeypatch):
    """A 16-bit slide warns while it is read: the user sees `warning: <message>` once, one line."""
    import types

    import tifffile

    from tests.test_segment_slide import FakeRun

    path = tmp_path / "s16.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 60000, (40, 50, 3)).astype(np.uint16),
                     photometric="rgb")
    monkeypatch.setitem(sys.modules, "diffusiondci.segmentation.run",
                        types.SimpleNamespace(load_segmenter=lambda *a, **k: FakeRun(roi_size=16)))
    shown = warnings.showwarning
    result = CliRunner().invoke(app, ["segment", str(path), "--model", "run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if "16-bit" in ln or "Warning" in ln or "warn(" in ln]
    assert lines == [f"warning: {path}: 16-bit slide rescaled to 8 bit (value / 257)"]
    assert warnings.showwarning is shown  # restored after the command


# ----------------------------------------------------------------------------- item 7: progress in logs


def test_progress_off_a_terminal_is_plain_lines():
    from diffusiondci.progress import LineProgress, progress_bar

    stream = io.StringIO()
    bar = progress_bar(10, "run", unit="step", stream=stream, interval=0)
    assert isinstance(bar, LineProgress)
    for _ in range(10):
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("run: 10/10 steps (100.0%) loss=0.5")
    assert "steps/s" in lines[3] or "s/step" in lines[3]
    assert "ETA" in lines[3] and "took" in lines[-1]

    quiet = io.StringIO()  # the default interval: nothing for a short job
    with progress_bar(5, "short", stream=quiet) as b:
        b.update(5)
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress_bar(3, "tty", stream=Terminal()), LineProgress)


def test_training_progress_in_a_log_has_no_carriage_returns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSIONDCI_PROGRESS_SECONDS", "0")
    tr = tiny_trainer(tmp_path / "run", max_steps=4)
    tr.progress = True
    tr.fit()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("run: ")]
    assert lines and lines[-1].startswith("run: 4/4 steps (100.0%)") and "loss=" in lines[-1]
    assert any("ETA" in ln for ln in lines)


def test_segment_progress_counts_windows_in_a_log(tmp_path, capsys, monkeypatch):
    from diffusiondci.inference.slide import segment_slide
    from tests.test_segment_slide import FakeRun, _blocks, _write

    monkeypatch.setenv("DIFFUSIONDCI_PROGRESS_SECONDS", "0")
    path = _write(tmp_path / "big.png", _blocks(200, 260))
    segment_slide(FakeRun(patch_size=32), path, tmp_path / "out", batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    windows = [ln for ln in err.splitlines() if ln.startswith("segmenting big: ")]
    assert len(windows) > 2 and "windows (100.0%)" in windows[-1]


# ----------------------------------------------------------------------------- item 8 and issue 16: help, presets


def _params(name: str) -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands[name].params}


def test_help_shows_preset_defaults_flags_and_suffixes():
    seg, enc = _params("train-seg"), _params("train-encoder")
    assert seg["steps"].show_default == "from preset: tiny 1000; paper 200 epochs"
    assert enc["steps"].show_default == "from preset: tiny 150; paper 20000"
    assert enc["lr"].show_default.startswith("from preset: tiny 0.001; paper")
    ctx = typer.main.get_command(app).make_context("train-seg", ["x", "--out", "y"], resilient_parsing=True)
    assert seg["resume"].display_type_rich(ctx) is None  # a switch, no "<bool>"
    assert seg["steps"].display_type_rich(ctx) == "<int>"
    assert ".tiff" in _params("prepare")["masks"].help and ".tiff" in _params("sample")["masks"].help
    text = CliRunner().invoke(app, ["train-seg", "--help"], env={"TERMINAL_WIDTH": "240"}).output
    assert "<bool>" not in text and "from preset: tiny 1000" in text and "--resume" in text


def test_every_command_has_the_same_default_preset(monkeypatch, tmp_path):
    takes_preset = []
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if param.name == "preset":
                takes_preset.append(name)
                assert param.default == "paper", name
                assert param.envvar == "DIFFUSIONDCI_PRESET", name
    assert {"prepare", "train-encoder", "train-dsdm", "train-seg", "sample", "probe", "experiment"} <= set(takes_preset)
    # the environment variable applies to every command, experiment included
    monkeypatch.setenv("DIFFUSIONDCI_PRESET", "nonesuch")
    result = CliRunner().invoke(app, ["experiment", "table5", "--data", str(tmp_path), "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, UserInputError) and "nonesuch: unknown preset" in str(result.exception)


def test_train_encoder_takes_lr(inputs, tmp_path, monkeypatch):
    from diffusiondci.train import encoder as encoder_mod

    seen = {}

    def fake_train(data, out, cfg, **kw):
        seen["lr"] = cfg.lr
        return Path(out)

    monkeypatch.setattr(encoder_mod, "train_encoder", fake_train)
    result = CliRunner().invoke(app, ["train-encoder", str(inputs["data"]), "--out", str(tmp_path / "e"),
                                      "--preset", "tiny", "--lr", "0.0002"])
    assert result.exit_code == 0, result.output
    assert seen["lr"] == pytest.approx(2e-4)


def test_default_blocks_must_fit_the_dsdm_depth(monkeypatch):
    """The paper preset's blocks on a shallower DSDM: a clear error naming --blocks and the range."""
    from diffusiondci.diffusion import dsdm_run
    from diffusiondci.diffusion.schedule import DiffusionSchedule
    from diffusiondci.models.unet import DSDMUNet, tiny_config
    from diffusiondci.train.seg_config import SegConfig
    from diffusiondci.train.segmentation import build_model, check_blocks

    with pytest.raises(UserInputError, match=r"--blocks, or seg\.blocks.*decoder blocks 0\.\.5"):
        check_blocks([6, 7, 8, 9, 10], 6, Path("dsdm"))
    check_blocks([1, 2, 3], 6, Path("dsdm"))
    dsdm = DSDMUNet(tiny_config(**{**MICRO, "image_size": 32, "decoder_norm": "group", "use_reference": False}))
    monkeypatch.setattr(dsdm_run, "load_dsdm", lambda *a, **k: (dsdm, DiffusionSchedule(100), None))
    paper_blocks = load_section("paper", "seg")["blocks"]
    cfg = build(SegConfig, load_section("tiny", "seg"), blocks=paper_blocks, timesteps=[50])
    last = dsdm.num_decoder_blocks - 1
    with pytest.raises(UserInputError, match=rf"which this DSDM lacks: .* decoder blocks 0\.\.{last}"):
        build_model(cfg, 32, Path("dsdm_run"))


def test_preset_names_are_checked(tmp_path):
    from diffusiondci.config import preset_path

    with pytest.raises(UserInputError, match="unknown preset"):
        preset_path("papper")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seg: [unclosed\n")
    with pytest.raises(UserInputError, match="invalid YAML"):
        load_preset(str(bad))
    assert pickle.dumps(UserInputError("x"))  # errors travel between processes (DDP broadcast)
