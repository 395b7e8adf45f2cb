"""Is the CUDA-graph decoding step the same function as the eager one at the 7B sizes? Random weights, one video,
teacher-forced decoding with and without the graph, in fp32 (where rounding cannot hide a defect) and in bf16.

    PYTHONPATH=src python benchmarks/check_decode_graph_7b.py --frames 256
"""

import argparse
import json

import torch
from bench_utils import relative
from bench_vamba import build, seven_b_setup, video_inputs


def teacher_forced_logits(model, setup, frames: int, steps: int, graph: bool) -> torch.Tensor:
    model.config.decode_with_cuda_graph = graph
    ids, pixels, grid = video_inputs(setup, frames)
    out = model(input_ids=ids, pixel_values_videos=pixels.to(model.dtype), video_grid_thw=grid, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.past_key_values, []
    for token in range(1000, 1000 + steps):
        logits.append(model(input_ids=torch.tensor([[token]], device="cuda"), past_key_values=cache).logits[:, -1])
    return torch.stack(logits).float()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    for dtype in (torch.float32, torch.bfloat16):
        setup = seven_b_setup({})
        model = build(setup).to(dtype)
        with torch.inference_mode():
            eager = teacher_forced_logits(model, setup, args.frames, args.steps, graph=False)
            graph = teacher_forced_logits(model, setup, args.frames, args.steps, graph=True)
        print(json.dumps({"check": "decode graph vs eager, 7B sizes", "dtype": str(dtype).split(".")[-1],
                          "frames": args.frames, "steps": args.steps, "relative": relative(graph, eager),
                          "first_step_relative": relative(graph[0], eager[0])}), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
