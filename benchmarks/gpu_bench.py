"""DSDM training-step speed of a preset's SM+RI network on one device, by precision, memory layout and
attention path (issue 14, item 5: the user guide's GPU table).

    python benchmarks/gpu_bench.py [--preset paper] [--batch N] [--steps 20] [--out gpu_bench.json]

Each row times full optimizer steps of the DSDM loss (L_simple with min-SNR weights + lambda L_vlb,
mask one-hot, reference embedding, Adam, gradient clipping) on random data: ``fp32``; ``fp32 + TF32``
(CUDA matmuls and convolutions in TF32); ``bf16`` autocast (where the device has it natively);
each precision also with ``channels_last`` and with ``no SDPA`` (MONAI's own attention instead of
PyTorch's ``scaled_dot_product_attention``, whose flash kernel the other rows may use); and with
``--compile`` ``bf16 + torch.compile``. Rows are interleaved round by round so that a busy machine slows all of
them alike; the best round counts. Prints a table (steps/s, images/s, peak GPU memory) and writes JSON.

It imports only the network, the schedule, the loss and the preset reader (PyTorch, MONAI, einops,
PyYAML), so on a machine with PyTorch but without this package installed it runs from a checkout
with ``PYTHONPATH=src`` (carry a MONAI wheel if that machine has none):

    PYTHONPATH=src python3 benchmarks/gpu_bench.py --out $OUT/gpu_bench.json

On a CPU ``--preset tiny --steps 2`` is a smoke run (TF32 rows are skipped; bf16 rows run only
where the CPU has native bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffusiondci.config import load_section
from diffusiondci.device import native_bf16, resolve_device
from diffusiondci.diffusion.losses import hybrid_loss, min_snr_weights
from diffusiondci.diffusion.schedule import DiffusionSchedule
from diffusiondci.models.conditions import mask_one_hot
from diffusiondci.models.unet import UNET_PRESETS, DSDMUNet

ROWS = ("fp32", "fp32 + TF32", "fp32 + channels_last", "fp32, no SDPA", "bf16", "bf16 + channels_last", "bf16, no SDPA",
        "bf16 + torch.compile")


def _set_tf32(row: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "TF32" in row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(row: str, preset: str, batch: int, device: torch.device) -> tuple[Callable[[], float], int]:
    """(one optimizer step returning its loss, parameter count) for a table row."""
    dsdm, size = load_section(preset, "dsdm"), load_section(preset, "prepare")["patch_size"]
    torch.manual_seed(0)
    net_cfg = UNET_PRESETS[dsdm["unet"]](**{**(dsdm.get("unet_overrides") or {}), "image_size": size,
                                           "use_flash_attention": "no SDPA" not in row})
    model = DSDMUNet(net_cfg).to(device)
    schedule = DiffusionSchedule(1000, "cosine")
    x0 = torch.randn(batch, 3, size, size, device=device)
    mask = mask_one_hot(torch.randint(0, 3, (batch, size, size), device=device), 3)
    ref = torch.randn(batch, 512, device=device)
    if "channels_last" in row:
        model = model.to(memory_format=torch.channels_last)
        x0, mask = (v.contiguous(memory_format=torch.channels_last) for v in (x0, mask))
    net: Callable[..., torch.Tensor] = torch.compile(model) if "compile" in row else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    bf16 = row.startswith("bf16")
    layout = torch.channels_last if "channels_last" in row else torch.contiguous_format

    def step() -> float:
        t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
        noise = torch.randn(x0.shape, device=device).contiguous(memory_format=layout)  # same draws in every layout
        x_t = schedule.q_sample(x0, t, noise)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            out = net(x_t, t, mask=mask, ref=ref)
        terms = hybrid_loss(schedule, out.float(), x0, x_t, t, noise, lambda_vlb=0.001, reduction="mean",
                            mse_weights=min_snr_weights(schedule, t, 5.0))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(terms["loss"].detach())

    return step, sum(p.numel() for p in model.parameters())


def run_table(preset: str, batch: int, steps: int, rounds: int, device: torch.device, compile_row: bool) -> dict:
    rows = [r for r in ROWS if (compile_row or "compile" not in r)]
    if device.type != "cuda":
        rows = [r for r in rows if "TF32" not in r]
    if not native_bf16(device):
        rows = [r for r in rows if not r.startswith("bf16")]
    table: dict[str, dict] = {}
    steps_fns = {}
    for row in rows:
        _set_tf32(row)
        try:
            fn, n_params = make_step(row, preset, batch, device)
            start = time.perf_counter()
            for _ in range(3):  # warm-up (and torch.compile's compilation)
                fn()
            _sync(device)
            steps_fns[row] = fn
            table[row] = {"parameters": n_params, "warmup_s": round(time.perf_counter() - start, 1), "times": []}
        except (RuntimeError, torch.OutOfMemoryError) as err:  # report the row, keep the others
            table[row] = {"error": str(err).splitlines()[0][:300]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for _ in range(rounds):
        for row, fn in steps_fns.items():
            _set_tf32(row)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                loss = fn()
            _sync(device)
            table[row]["times"].append((time.perf_counter() - start) / steps)
            table[row]["last_loss"] = round(loss, 4)
            if device.type == "cuda":
                table[row]["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    base = min(table["fp32"]["times"]) if table.get("fp32", {}).get("times") else None
    for row, entry in table.items():
        if entry.get("times"):
            best = min(entry.pop("times"))
            entry.update(steps_per_s=round(1 / best, 3), images_per_s=round(batch / best, 2),
                         speedup_vs_fp32=round(base / best, 2) if base else None)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="tiny | paper | a YAML file: its dsdm network and patch size")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: the preset's dsdm batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the GPU if there is one)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (compiles in the warm-up)")
    parser.add_argument("--out", type=Path, default=Path("bench_output/gpu_bench.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.batch is None:
        args.batch = int(load_section(args.preset, "dsdm")["batch_size"])
    info = {"preset": args.preset, "batch": args.batch, "device": str(device), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "native_bf16": native_bf16(device), "steps_per_round": args.steps, "rounds": args.rounds}
    print(json.dumps(info), flush=True)
    table = run_table(args.preset, args.batch, args.steps, args.rounds, device, args.compile)
    print(f"{'row':24s} {'steps/s':>8s} {'images/s':>9s} {'x fp32':>7s} {'peak GiB':>9s}")
    for row, e in table.items():
        if "error" in e:
            print(f"{row:24s} error: {e['error']}")
        else:
            print(f"{row:24s} {e['steps_per_s']:8.2f} {e['images_per_s']:9.1f} {e['speedup_vs_fp32'] or 0:7.2f} "
                  f"{e.get('peak_gib', float('nan')):9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**info, "rows": table}, indent=2))
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
