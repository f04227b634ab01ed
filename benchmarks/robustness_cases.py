"""Malformed input and damaged runs, tried for real: what the user sees, the exit status, what is
left on disk.

Builds a tiny world (the generated sample -> `prepare` at `tiny`, a 2-step encoder, a 2-step DSDM
with a micro U-Net, a 2-step segmenter), then runs every case through the `diffusiondci` command line
(in this process by default, through ``main`` as the console script does; ``--subprocess`` starts a
real process per case) against a fresh copy of whatever the case damages, and compares the folders
before and after. Prints a Markdown table (docs/robustness.md holds one) and exits 1 if a case did
not end with exit status 2, one error line, and nothing changed that should not have.

    .venv/bin/python benchmarks/robustness_cases.py [--work DIR] [--subprocess] [--out table.md]

A few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

MICRO_UNET = dict(channels=[16, 32, 32], attention_levels=[False, False, True], num_head_channels=16,
                  norm_num_groups=8, spade_hidden_channels=16, ref_tokens=4)


# ----------------------------------------------------------------------------- running the CLI


def cli(args: list[str], use_subprocess: bool = False) -> tuple[int, str, str]:
    """``diffusiondci ARGS``: (exit status, stdout, stderr)."""
    args = [str(a) for a in args]
    if use_subprocess:
        proc = subprocess.run([sys.executable, "-m", "diffusiondci.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": ""})
        return proc.returncode, proc.stdout, proc.stderr
    from diffusiondci.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["diffusiondci", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
            except Exception as exc:  # a crash: what the user would see is a traceback
                err.write(f"TRACEBACK {type(exc).__name__}: {exc}\n")
                code = 1
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


def snapshot(*folders: Path) -> dict[str, tuple]:
    """Every file and folder under ``folders``: contents hash and modification time."""
    out: dict[str, tuple] = {}
    for folder in folders:
        if not folder.exists():
            out[str(folder)] = ("absent",)
            continue
        if folder.is_file():
            out[str(folder)] = (hashlib.sha256(folder.read_bytes()).hexdigest(), folder.stat().st_mtime_ns)
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_dir():
                out[str(p)] = ("dir",)
            else:
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        out[str(folder)] = ("dir",)
    return out


def describe_change(before: dict[str, tuple], after: dict[str, tuple], root: Path) -> str:
    def rel(k: str) -> str:
        try:
            return str(Path(k).relative_to(root))
        except ValueError:
            return k

    added = sorted(rel(k) for k in after if k not in before or before[k] == ("absent",) and after[k] != ("absent",))
    removed = sorted(rel(k) for k in before if before[k] != ("absent",) and (k not in after or after[k] == ("absent",)))
    changed = sorted(rel(k) for k in before if k in after and before[k] != after[k]
                     and ("absent",) not in (before[k], after[k]))
    parts = []
    if added:
        parts.append("created " + ", ".join(added[:4]) + (" ..." if len(added) > 4 else ""))
    if removed:
        parts.append("removed " + ", ".join(removed[:4]) + (" ..." if len(removed) > 4 else ""))
    if changed:
        parts.append("rewritten " + ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else ""))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the tiny world


@dataclass
class World:
    root: Path
    data: Path
    encoder: Path
    dsdm: Path
    seg: Path
    preset: Path
    slide: Path


def build_world(root: Path, use_subprocess: bool) -> World:
    from diffusiondci.config import load_preset
    from diffusiondci.data.phantom import write_sample

    root.mkdir(parents=True, exist_ok=True)
    sample = root / "sample"
    if not (sample / "slides").is_dir():
        write_sample(sample, seed=1, size=(384, 384), tile_size=128)
    preset = root / "micro.yaml"
    values = load_preset("tiny")
    values["dsdm"].update(unet_overrides=MICRO_UNET, sample_every=0, batch_size=4, ckpt_every=1, log_every=1,
                          lr_warmup=0, autocast="fp32")
    values["encoder"].update(batch_size=4, ckpt_every=1, log_every=1)
    values["seg"].update(blocks=[1, 2], timesteps=[50], batch_size=4, val_every=2, ckpt_every=1, log_every=1)
    preset.write_text(yaml.safe_dump(values, sort_keys=False))
    slides = sorted(p for p in (sample / "slides").iterdir()
                    if p.suffix in (".png", ".tif") and not p.stem.endswith("_mask"))
    w = World(root, root / "ds", root / "enc", root / "dsdm", root / "seg", preset, slides[0])
    steps = [
        (w.data / "dataset.json", ["prepare", sample / "slides", "--out", w.data, "--preset", "tiny",
                                   "--tile-size", "128", "--groups", sample / "slides" / "groups.csv"]),
        (w.encoder / "embeddings.json", ["train-encoder", w.data, "--out", w.encoder, "--preset", preset,
                                         "--steps", "2", "--device", "cpu"]),
        (w.dsdm / "metrics.json", ["train-dsdm", w.data, "--out", w.dsdm, "--encoder", w.encoder,
                                   "--preset", preset, "--steps", "2", "--device", "cpu"]),
        (w.seg / "test_metrics.json", ["train-seg", w.data, "--out", w.seg, "--dsdm", w.dsdm, "--preset", preset,
                                       "--steps", "2", "--device", "cpu"]),
    ]
    for marker, args in steps:
        if not marker.is_file():
            t0 = time.perf_counter()
            code, out, err = cli(args, use_subprocess)
            if code != 0:
                raise SystemExit(f"setup failed: diffusiondci {' '.join(map(str, args))}\n{out}\n{err}")
            print(f"setup: {args[0]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return w


# ----------------------------------------------------------------------------- damage


def truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def alter(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def pickle_payload(ckpt_dir: Path, marker: Path) -> None:
    """train_state.pt that would create ``marker`` if unpickled; meta.json updated to match."""
    import torch

    from diffusiondci.runs.checkpoint import META_FILE, STATE_FILE, sha256_file

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    state = ckpt_dir / STATE_FILE
    torch.save({"step": 2, "payload": Payload()}, state)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    meta["files"][STATE_FILE] = {"sha256": sha256_file(state), "bytes": state.stat().st_size}
    (ckpt_dir / META_FILE).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    command: str  # shown in the table
    make: Callable[[World, Path], tuple[list, list[Path]]]  # (args, folders that must not change)
    expect_code: int = 2
    note: str = ""


@dataclass
class Result:
    case: Case
    code: int
    line: str
    lines: int
    disk: str
    ok: bool
    extra: list[str] = field(default_factory=list)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cases() -> list[Case]:
    L = "checkpoints/latest"

    def resume_damaged(kind: str, file: str, how: Callable[[Path], None]):
        def make(w: World, tmp: Path):
            run = copy(getattr(w, {"enc": "encoder"}.get(kind, kind)), tmp / kind)
            how(run / L / file)
            cmd = {"enc": ["train-encoder", w.data], "dsdm": ["train-dsdm", w.data, "--encoder", w.encoder],
                   "seg": ["train-seg", w.data, "--dsdm", w.dsdm]}[kind]
            return [*cmd, "--out", run, "--preset", w.preset, "--steps", "3", "--device", "cpu", "--resume"], [run]
        return make

    def meta_deleted(w: World, tmp: Path):
        run = copy(w.encoder, tmp / "enc")
        (run / L / "meta.json").unlink()
        return ["train-encoder", w.data, "--out", run, "--preset", w.preset, "--steps", "3", "--resume"], [run]

    def meta_garbage(w: World, tmp: Path):
        run = copy(w.dsdm, tmp / "dsdm")
        (run / L / "meta.json").write_text('{"format": "diffusiondci-checkp')
        return ["train-dsdm", w.data, "--out", run, "--encoder", w.encoder, "--preset", w.preset, "--steps", "3",
                "--resume"], [run]

    def payload(w: World, tmp: Path):
        run = copy(w.encoder, tmp / "enc")
        pickle_payload(run / L, tmp / "PWNED")
        return ["train-encoder", w.data, "--out", run, "--preset", w.preset, "--steps", "3", "--device", "cpu",
                "--resume"], [run, tmp / "PWNED"]

    def segment_damaged(w: World, tmp: Path):
        run = copy(w.seg, tmp / "seg")
        best = run / "checkpoints" / ("best" if (run / "checkpoints" / "best").is_dir() else "latest")
        alter(best / "model.safetensors")
        return ["segment", w.slide, "--model", run, "--out", tmp / "out", "--device", "cpu"], [run, tmp / "out"]

    def segment_no_ckpt(w: World, tmp: Path):
        run = copy(w.seg, tmp / "seg")
        shutil.rmtree(run / "checkpoints")
        return ["segment", w.slide, "--model", run, "--out", tmp / "out", "--device", "cpu"], [run, tmp / "out"]

    def segment_payload(w: World, tmp: Path):
        from diffusiondci.runs.checkpoint import sha256_file

        run = copy(w.seg, tmp / "seg")
        for name in ("best", "latest"):
            folder = run / "checkpoints" / name
            if folder.is_dir():  # a pickle where the weights were, meta.json forged to match
                f = folder / "model.safetensors"
                size = f.stat().st_size
                f.write_bytes((b"\x80\x04\x95" + b"cos\nsystem\n" * size)[:size])
                meta = json.loads((folder / "meta.json").read_text())
                meta["files"]["model.safetensors"] = {"sha256": sha256_file(f), "bytes": size}
                (folder / "meta.json").write_text(json.dumps(meta))
        return ["segment", w.slide, "--model", run, "--out", tmp / "out", "--device", "cpu"], [run, tmp / "out"]

    def sample_damaged(w: World, tmp: Path):
        run = copy(w.dsdm, tmp / "dsdm")
        truncate(run / L / "ema.safetensors")
        return ["sample", "--model", run, "--masks", w.data, "--split", "train", "--out", tmp / "synth",
                "--preset", w.preset, "--device", "cpu"], [run, tmp / "synth"]

    def out_dataset(w: World, tmp: Path):
        return ["train-seg", w.data, "--out", w.data, "--dsdm", w.dsdm, "--preset", w.preset, "--steps", "2"], [w.data]

    def out_unrelated(w: World, tmp: Path):
        other = tmp / "my_notes"
        other.mkdir()
        (other / "notes.txt").write_text("mine")
        return ["train-encoder", w.data, "--out", other, "--preset", w.preset, "--steps", "2"], [other]

    def out_other_kind(w: World, tmp: Path):
        run = copy(w.dsdm, tmp / "dsdm")
        return ["train-seg", w.data, "--out", run, "--dsdm", w.dsdm, "--preset", w.preset, "--steps", "2",
                "--resume"], [run]

    def out_existing_run(w: World, tmp: Path):
        run = copy(w.dsdm, tmp / "dsdm")
        return ["train-dsdm", w.data, "--out", run, "--encoder", w.encoder, "--preset", w.preset, "--steps", "2"], [run]

    def resume_nothing(w: World, tmp: Path):
        return ["train-seg", w.data, "--out", tmp / "new_run", "--dsdm", w.dsdm, "--preset", w.preset,
                "--resume"], [tmp / "new_run"]

    def flag(args_of: Callable[[World, Path], list]):
        def make(w: World, tmp: Path):
            return args_of(w, tmp), [tmp / "run", w.data]
        return make

    def no_encoder(w: World, tmp: Path):
        return ["train-dsdm", w.data, "--out", tmp / "run", "--preset", w.preset, "--steps", "2"], [tmp / "run"]

    def not_encoder(w: World, tmp: Path):
        return ["train-dsdm", w.data, "--out", tmp / "run", "--encoder", w.dsdm.parent / "sample", "--preset",
                w.preset, "--steps", "2"], [tmp / "run"]

    def bad_yaml(w: World, tmp: Path):
        (tmp / "bad.yaml").write_text("seg:\n  steps: [2\n")
        return ["train-seg", w.data, "--out", tmp / "run", "--preset", tmp / "bad.yaml"], [tmp / "run"]

    def unknown_key(w: World, tmp: Path):
        values = yaml.safe_load(w.preset.read_text())
        values["seg"]["stpes"] = 10
        (tmp / "typo.yaml").write_text(yaml.safe_dump(values))
        return ["train-seg", w.data, "--out", tmp / "run", "--dsdm", w.dsdm, "--preset", tmp / "typo.yaml"], [tmp / "run"]

    def steps_zero_in_yaml(w: World, tmp: Path):
        values = yaml.safe_load(w.preset.read_text())
        values["encoder"]["steps"] = 0
        (tmp / "zero.yaml").write_text(yaml.safe_dump(values))
        return ["train-encoder", w.data, "--out", tmp / "run", "--preset", tmp / "zero.yaml"], [tmp / "run"]

    def changed_config(w: World, tmp: Path):
        run = copy(w.seg, tmp / "seg")
        return ["train-seg", w.data, "--out", run, "--dsdm", w.dsdm, "--preset", w.preset, "--steps", "3",
                "--lr", "0.01", "--resume"], [run]

    def segment_dsdm_as_model(w: World, tmp: Path):
        return ["segment", w.slide, "--model", w.dsdm, "--out", tmp / "out"], [w.dsdm, tmp / "out"]

    def missing_input(w: World, tmp: Path):
        return ["segment", tmp / "no_such_slide.tif", "--model", w.seg, "--out", tmp / "out"], [w.seg, tmp / "out"]

    def truncated_slide(w: World, tmp: Path):
        slide = tmp / "cut.png"
        data = w.slide.read_bytes()
        slide.write_bytes(data[: len(data) // 3])
        return ["segment", slide, "--model", w.seg, "--out", tmp / "out", "--device", "cpu"], [w.seg, tmp / "out"]

    def bad_blocks(w: World, tmp: Path):
        return ["train-seg", w.data, "--out", tmp / "run", "--dsdm", w.dsdm, "--preset", w.preset, "--steps", "2",
                "--blocks", "1,40", "--device", "cpu"], [tmp / "run", w.dsdm]

    return [
        Case("truncated weights, resumed", "train-seg --resume (latest/model.safetensors cut in half)",
             resume_damaged("seg", "model.safetensors", truncate)),
        Case("altered weights (same size), resumed", "train-seg --resume (one byte of latest/model.safetensors flipped)",
             resume_damaged("seg", "model.safetensors", alter)),
        Case("truncated EMA weights, resumed", "train-dsdm --resume (latest/ema.safetensors cut)",
             resume_damaged("dsdm", "ema.safetensors", truncate)),
        Case("altered training state, resumed", "train-encoder --resume (latest/train_state.pt altered)",
             resume_damaged("enc", "train_state.pt", alter)),
        Case("checkpoint without meta.json", "train-encoder --resume (latest/meta.json deleted)", meta_deleted),
        Case("unreadable meta.json", "train-dsdm --resume (latest/meta.json cut mid-JSON)", meta_garbage),
        Case("pickle payload in train_state.pt", "train-encoder --resume (train_state.pt runs code if unpickled; "
             "meta.json forged to match)", payload),
        Case("damaged best checkpoint", "segment (checkpoints/best/model.safetensors altered)", segment_damaged),
        Case("weights file not safetensors", "segment (model.safetensors replaced by pickle bytes, meta.json "
             "forged to match)",
             segment_payload),
        Case("run without checkpoints", "segment (checkpoints/ deleted)", segment_no_ckpt),
        Case("damaged DSDM checkpoint", "sample (latest/ema.safetensors cut)", sample_damaged),
        Case("--out is the dataset", "train-seg DATA --out DATA", out_dataset),
        Case("--out is an unrelated non-empty folder", "train-encoder --out my_notes/", out_unrelated),
        Case("--out holds another kind of run", "train-seg --out DSDM_RUN --resume", out_other_kind),
        Case("--out holds a run, no --resume", "train-dsdm --out DSDM_RUN", out_existing_run),
        Case("--resume without a run", "train-seg --out new_run --resume", resume_nothing),
        Case("--steps 0", "train-seg --steps 0",
             flag(lambda w, t: ["train-seg", w.data, "--out", t / "run", "--dsdm", w.dsdm, "--preset", w.preset,
                                "--steps", "0"])),
        Case("steps: 0 in a YAML preset", "train-encoder --preset zero.yaml", steps_zero_in_yaml),
        Case("--lr 0", "train-encoder --lr 0",
             flag(lambda w, t: ["train-encoder", w.data, "--out", t / "run", "--preset", w.preset, "--lr", "0"])),
        Case("--batch-size 0", "train-dsdm --batch-size 0",
             flag(lambda w, t: ["train-dsdm", w.data, "--out", t / "run", "--encoder", w.encoder, "--preset",
                                w.preset, "--batch-size", "0"])),
        Case("--steps 0 when sampling", "sample --steps 0",
             flag(lambda w, t: ["sample", "--model", w.dsdm, "--masks", w.data, "--out", t / "run", "--preset",
                                w.preset, "--steps", "0"])),
        Case("unknown --injection", "train-seg --injection bogus",
             flag(lambda w, t: ["train-seg", w.data, "--out", t / "run", "--preset", w.preset, "--injection",
                                "bogus"])),
        Case("missing encoder", "train-dsdm (no --encoder)", no_encoder),
        Case("--encoder is not an encoder run", "train-dsdm --encoder sample/", not_encoder),
        Case("blocks the DSDM lacks", "train-seg --blocks 1,40", bad_blocks),
        Case("wrong preset name", "train-seg --preset papper",
             flag(lambda w, t: ["train-seg", w.data, "--out", t / "run", "--preset", "papper"])),
        Case("bad YAML", "train-seg --preset bad.yaml (unclosed list)", bad_yaml),
        Case("unknown config key", "train-seg --preset typo.yaml (seg.stpes)", unknown_key),
        Case("missing dataset", "train-encoder no_such_dataset/",
             flag(lambda w, t: ["train-encoder", t / "no_such_dataset", "--out", t / "run", "--preset", w.preset])),
        Case("changed settings on resume", "train-seg --resume --lr 0.01", changed_config),
        Case("a DSDM run as --model", "segment --model DSDM_RUN", segment_dsdm_as_model),
        Case("missing slide", "segment no_such_slide.tif", missing_input),
        Case("truncated slide", "segment cut.png (a third of a PNG)", truncated_slide),
    ]


def run_case(case: Case, world: World, use_subprocess: bool) -> Result:
    with tempfile.TemporaryDirectory(dir=world.root) as tmp_name:
        tmp = Path(tmp_name)
        args, watched = case.make(world, tmp)
        before = snapshot(*watched)
        code, out, err = cli(args, use_subprocess)
        after = snapshot(*watched)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        errors = [ln for ln in lines if not ln.startswith("warning:")]
        line = errors[0] if errors else (lines[0] if lines else "")
        line = line.replace(str(tmp), "TMP").replace(str(world.root), "WORLD")
        disk = describe_change(before, after, tmp)
        ok = code == case.expect_code and len(errors) == 1 and errors[0].startswith("error: ") and not disk
        return Result(case, code, line, len(errors), disk or "unchanged: nothing created or rewritten", ok)


def table(results: list[Result]) -> str:
    rows = ["| # | case | command | what the user sees (stderr) | exit | on disk afterwards |",
            "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        seen = r.line.replace("|", "\\|")
        if r.lines != 1:
            seen += f" ({r.lines} error lines)"
        rows.append(f"| {i} | {r.case.name} | `{r.case.command}` | `` {seen} `` | {r.code} | {r.disk} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the tiny world (default: a temp folder)")
    parser.add_argument("--subprocess", action="store_true", help="run every case as its own process")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    os.environ.setdefault("DIFFUSIONDCI_PROGRESS_SECONDS", "3600")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="robustness_")))
        world = build_world(work, args.subprocess)
        results = []
        for case in cases():
            r = run_case(case, world, args.subprocess)
            results.append(r)
            print(f"{'ok  ' if r.ok else 'FAIL'} {case.name}: {r.code} {r.line}", file=sys.stderr)
        text = table(results)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = [r.case.name for r in results if not r.ok]
    print(f"{len(results)} cases, {len(results) - len(bad)} as expected, {time.perf_counter() - t0:.0f} s"
          + (f"; not as expected: {', '.join(bad)}" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
