"""Same call A/B of the two ways to run Vamba's decoding step without the CPU's launch overhead: the CUDA-graph step
(the default cache, `DecodeGraph`) against transformers' own path, `generate(..., cache_implementation="static")`,
whose decoding forward transformers compiles on CUDA (Inductor, "reduce-overhead": CUDA graphs of the compiled
step). Random bf16 weights of the 7B's widths with fewer layers (`--layers`, so that the compile fits the call);
greedy decoding after a 64-frame prefill. Per-token time = (generate of 8 + N tokens - generate of 8 tokens) / N,
medians of `--repeats` after a warm-up call of each variant (which compiles / captures); the greedy ids of the two
variants are compared.

    python benchmarks/diagnostics/decode_static_compiled.py [--layers 8] [--tokens 64] [--tiny]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_vamba  # noqa: E402
from bench_utils import synchronize  # noqa: E402

VARIANTS = {"CUDA-graph step (default cache)": {}, "static cache, compiled by generate": {
    "cache_implementation": "static"}}


def generate_seconds(model, inputs: dict, new_tokens: int, options: dict):
    synchronize(model.device)
    started = time.perf_counter()
    ids = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)
    synchronize(model.device)
    return time.perf_counter() - started, ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a check of the script)")
    args = parser.parse_args()
    overrides = {"num_hidden_layers": args.layers, "vision_config": {"depth": 4}}
    setup = bench_vamba.tiny_setup({}) if args.tiny else bench_vamba.seven_b_setup(overrides)
    model = bench_vamba.build(setup)
    ids, pixels, grid = bench_vamba.video_inputs(setup, args.frames)
    inputs = dict(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
    record = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "layers": setup.config.num_hidden_layers, "frames": args.frames, "tokens": args.tokens}
    sequences = {}
    with torch.inference_mode():
        for name, options in VARIANTS.items():
            warm_s, _ = generate_seconds(model, inputs, 8 + args.tokens, options)
            per_token = []
            for _ in range(args.repeats):
                short_s, _ = generate_seconds(model, inputs, 8, options)
                long_s, sequences[name] = generate_seconds(model, inputs, 8 + args.tokens, options)
                per_token.append((long_s - short_s) / args.tokens * 1e3)
            record[name] = {"ms_per_token": statistics.median(per_token), "runs_ms": per_token,
                            "first_call_s": warm_s}
            print(name, record[name], flush=True)
    first, second = sequences.values()
    record["same_greedy_ids"] = int((first == second).sum()) - ids.shape[1]
    print(json.dumps(record))


if __name__ == "__main__":
    main()
