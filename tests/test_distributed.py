"""FSDP2 on CPU: a golden model sharded over two gloo processes trains like the unsharded model, in fp32 exactly and
under bf16 mixed precision with activation checkpointing. The same fine-tuning on 2 GPUs through `accelerate launch` is
in BENCHMARKS.md.

FSDP2 of torch <= 2.11 casts a sharded layer's float inputs to bf16 in the forward pass but not when activation
checkpointing recomputes the layer (transformers <= 5.17 checkpoints through the module's hooks), and the recompute must
save tensors of the dtypes the first pass saved. Newer torch and transformers no longer take that path, so the last
tests rebuild it: the layer's rotary angles arrive as bf16 in the first pass and fp32 in the recompute.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CHECKPOINTING, enable_checkpointing, golden_batch, golden_model, train_steps
from torch.utils.checkpoint import checkpoint

import vamba_hf.layers_vamba as layers
import vamba_hf.vision_vamba as vision
from vamba_hf.configuration_vamba import VambaVisionConfig

pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed for the CPU FSDP2 run", allow_module_level=True)

TESTS = Path(__file__).resolve().parent


def sharded_losses(case_dir: Path, mode: str, tmp_path: Path) -> list[float]:
    out = tmp_path / f"{mode}.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "fsdp_worker.py"), str(case_dir), str(out), mode]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    return result["losses"]


@pytest.fixture(scope="module")
def unsharded_losses(golden_dir):
    torch.manual_seed(0)
    model, batch = golden_model(golden_dir, "video_short"), golden_batch(golden_dir, "video_short")
    enable_checkpointing(model, CHECKPOINTING)
    return train_steps(model, batch)


def test_fsdp2_fp32_trains_exactly_like_one_process(golden_dir, tmp_path, unsharded_losses):
    losses = sharded_losses(golden_dir / "video_short", "fp32", tmp_path)
    assert unsharded_losses[-1] < unsharded_losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(unsharded_losses), rtol=1e-5, atol=1e-6)


def test_fsdp2_bf16_with_checkpointing_trains_like_fp32(golden_dir, tmp_path, unsharded_losses):
    losses = sharded_losses(golden_dir / "video_short", "bf16", tmp_path)
    # bf16 compute of a random tiny network: each loss within 2% of the fp32 run's, and falling the same way.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(unsharded_losses), rtol=2e-2, atol=0.0)
    assert losses[-1] < losses[0]


def cast_in_first_pass_only(layer):
    """`layer(x, cos, sin)` as torch <= 2.11's FSDP2 runs it under activation checkpointing."""
    passes = []

    def run(x, cos, sin):
        if not passes:
            cos, sin = cos.bfloat16(), sin.bfloat16()
        passes.append(cos.dtype)
        return layer(x, cos, sin)

    return run, passes


@pytest.mark.parametrize("fused", ["eager", "compiled"])
def test_vision_block_recomputes_with_angles_cast_in_the_first_pass_only(monkeypatch, fused):
    torch.manual_seed(0)
    config = VambaVisionConfig(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    config._attn_implementation = "sdpa"
    block = vision.VambaVisionBlock(config).to(torch.bfloat16)
    if fused == "compiled":
        # What FusedOnCuda runs on GPU; aot_eager partitions the graph (what decides the saved tensors) with no compiler.
        monkeypatch.setattr(block.attn, "fused_rotary",
                            torch.compile(layers.apply_rotary, dynamic=True, backend="aot_eager"))
    cos, sin = vision.VambaVisionRotary(config)(4, 4, "cpu")
    frames = torch.randn(2, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    run, passes = cast_in_first_pass_only(lambda x, c, s: vision.VambaVisionBlock.forward(block, x, (c, s)))

    checkpoint(run, frames, cos, sin, use_reentrant=False).float().square().sum().backward()
    assert passes == [torch.bfloat16, torch.float32]
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


def test_text_rotary_recomputes_with_angles_cast_in_the_first_pass_only():
    cos, sin = (t[None, None] for t in vision.VambaVisionRotary(
        VambaVisionConfig(embed_dim=32, num_heads=2))(4, 4, "cpu"))
    x = torch.randn(1, 2, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    run, passes = cast_in_first_pass_only(layers.apply_rotary)
    checkpoint(run, x, cos, sin, use_reentrant=False).float().square().sum().backward()
    assert passes == [torch.bfloat16, torch.float32]
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
