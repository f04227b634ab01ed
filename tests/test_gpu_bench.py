"""The prepared GPU benchmark (benchmarks/gpu_bench.py) runs, and its rows time the same computation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from diffusiondci.device import native_bf16

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_and_attention_rows_compute_the_same_steps(gpu_bench):
    # the output convolution starts at zero, so the first step's loss cannot tell the rows apart: compare
    # the third, after the attention and convolutions have had gradients
    losses = {}
    for row in ("fp32", "fp32 + channels_last", "fp32, no SDPA"):
        step, params = gpu_bench.make_step(row, "tiny", 2, torch.device("cpu"))
        losses[row] = [step() for _ in range(3)]
        assert params > 1_000_000
    assert losses["fp32"][0] != losses["fp32"][2]  # the network learned something between the steps
    for row in ("fp32 + channels_last", "fp32, no SDPA"):
        assert losses[row][2] == pytest.approx(losses["fp32"][2], rel=1e-3), row


def test_table_on_cpu_has_the_rows_this_cpu_can_run(gpu_bench):
    table = gpu_bench.run_table("tiny", batch=2, steps=1, rounds=1, device=torch.device("cpu"), compile_row=False)
    assert "fp32 + TF32" not in table and "bf16 + torch.compile" not in table  # CUDA-only / asked for only
    assert any(r.startswith("bf16") for r in table) == native_bf16(torch.device("cpu"))
    for row, entry in table.items():
        assert "error" not in entry, (row, entry)
        assert entry["steps_per_s"] > 0 and math.isfinite(entry["last_loss"])
    assert table["fp32"]["speedup_vs_fp32"] == 1.0
