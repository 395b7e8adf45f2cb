"""One rank of a tensor-parallel run on CPU (gloo): the tiny model saved at FOLDER, loaded with `tp_plan="auto"`,
runs one forward on a video prompt and a few greedy steps; rank 0 writes the logits and ids to OUT.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py FOLDER OUT

tests/test_tensor_parallel.py compares them with the same model in one process.
"""

import sys

import torch
from tp_inputs import GREEDY, inputs

from vamba_hf import VambaForConditionalGeneration


def tensor_parallel() -> dict:
    """`from_pretrained`'s tensor-parallel argument: a DistributedConfig from transformers 5.x, `tp_plan` before."""
    import inspect

    from transformers.distributed import DistributedConfig

    if "tp_plan" in inspect.signature(DistributedConfig).parameters:
        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}


def main(folder: str, out: str):
    model = VambaForConditionalGeneration.from_pretrained(folder, **tensor_parallel()).eval()
    weight = model.model.layers[0].self_attn.q_proj.weight
    sharded = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]  # a DTensor on 5.x
    with torch.no_grad():
        logits = model(**inputs()).logits
        ids = model.generate(**inputs(), **GREEDY)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits, "ids": ids, "world_size": torch.distributed.get_world_size(),
                    "q_rows": sharded}, out)
    # Both ranks leave together and close gloo themselves: a rank whose process group is torn down at exit while
    # the other still talks aborts ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
