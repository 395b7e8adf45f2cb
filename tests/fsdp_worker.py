"""A few training steps of a golden model, sharded with FSDP2 (`fully_shard`) over the processes of a CPU (gloo) group.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py GOLDEN_CASE OUT MODE

MODE is `fp32` (fp32 parameters) or `bf16` (bf16 compute through FSDP2's MixedPrecisionPolicy, which casts each
sharded layer's float inputs to bf16). Both run with gradient checkpointing. Rank 0 writes the per-step losses to
OUT. tests/test_distributed.py compares them with the same steps run unsharded in one process (`train`).
"""

import sys
from pathlib import Path

import torch
from helpers import enable_checkpointing, golden_batch, golden_model

from vamba_hf.decoder_vamba import VambaDecoderLayer
from vamba_hf.vision_vamba import VambaVisionBlock

STEPS = 3
CHECKPOINTING = {"use_reentrant": False}


def train(model, batch, steps: int = STEPS) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def shard(model, mode: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mode == "bf16"
              else MixedPrecisionPolicy())
    for module in model.modules():
        if isinstance(module, (VambaDecoderLayer, VambaVisionBlock)):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def main(case_dir: str, out: str, mode: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    case = Path(case_dir)
    model, batch = golden_model(case.parent, case.name), golden_batch(case.parent, case.name)
    enable_checkpointing(model, CHECKPOINTING)
    model = shard(model, mode)
    assert type(model).__name__.startswith("FSDP"), type(model)
    losses = train(model, batch)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "world_size": dist.get_world_size()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
