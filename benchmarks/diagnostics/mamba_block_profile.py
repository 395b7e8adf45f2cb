"""torch.profiler of one Mamba-2 block of the visual stream (VambaVisionMixer at 7B sizes, random weights, bf16,
16,384 tokens, in place as the model runs it) on each op table named on the command line: 3 warm-up calls, then
5 profiled; the CUDA kernels' table, top 14 by CUDA time.

    PYTHONPATH=src:benchmarks python benchmarks/diagnostics/mamba_block_profile.py mamba-ssm,triton
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from vamba_hf import VambaConfig
from vamba_hf.mamba2_vamba import VambaVisionMixer


def main(backends: list[str]) -> None:
    config = VambaConfig()
    with torch.device("cuda"):
        block = VambaVisionMixer(config).to(torch.bfloat16)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    visual = torch.randn(1, config.mamba_max_tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    for name in backends:
        block.mixer.backend_request = name
        with torch.inference_mode():
            for _ in range(3):
                block(visual.clone(), in_place=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    block(visual.clone(), in_place=True)
                torch.cuda.synchronize()
        print("==", name)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main(sys.argv[1].split(","))
