"""Vamba over several GPUs with accelerate's `device_map`: first token, decode ms/token and per-GPU peak memory at
long videos, and the greedy tokens against one GPU. Random weights at 7B sizes, bf16, SDPA, 640x360 frames
(299 visual tokens per 2 frames), random pixels.

    PYTHONPATH=src python benchmarks/bench_multi_gpu.py --gpus 2 --out bench_out --frames 8192,16384

Placements (--placements): the device map comes from `accelerate.infer_auto_device_map` on a meta-device copy of
the model, with `no_split_module_classes=model._no_split_modules` (a decoder layer stays whole with its Mamba-2
block, a vision block stays whole), then `accelerate.dispatch_model` places the weights:
  balanced    `max_memory` from `accelerate.utils.get_balanced_memory` (what `device_map="auto"` does)
  max-memory  a `max_memory` that gives GPU 0 `--gpu0-share` of the weights (the rest spread over the others), so
              the split is uneven on purpose
Per placement and frame count, one JSON line: the map's layer split, first_token_s (the prefill),
decode_ms_per_token over `--new-tokens` - 1 greedy steps from its cache, per-GPU peak GiB, whether every layer's
cross K/V lives on that layer's device, and whether the tokens equal the one-GPU run's (done for frame counts up to `--single-gpu-max-frames`, which one
GPU holds). Then the same comparison in fp32 on a smaller config (`--fp32-layers` layers) at `--fp32-frames`,
where bf16 rounding cannot change the tokens between the two kernel schedules. `--tiny` runs the whole path on CPU
at tiny sizes, every "GPU" being the CPU.
"""

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    Budget,
    ResultSink,
    add_common_arguments,
    cross_kv_of,
    failure,
    frame_counts,
    gpu_peaks_gib,
    output_cache,
    reset_gpu_peaks,
    start_run,
    timed,
)

from vamba_hf import VambaConfig, VambaForConditionalGeneration  # noqa: E402

GRID_7B, GRID_TINY = (26, 46), (4, 4)
PROMPT_7B = [151644, 8948, 198, 151652, 151653] + list(range(1000, 1020)) + [151645, 198, 151644, 77091, 198]
PLACEMENTS = ("balanced", "max-memory")


def model_config(tiny: bool, **overrides) -> VambaConfig:
    if tiny:
        from vamba_hf.demo import demo_config
        from vamba_hf.tiny import build_tiny_tokenizer

        config = demo_config(build_tiny_tokenizer())
        for key, value in overrides.items():
            if key == "vision_depth":
                config.vision_config.depth = value
            else:
                setattr(config, key, value)
        return config
    vision_depth = overrides.pop("vision_depth", None)
    return VambaConfig(**overrides, **({"vision_config": dict(depth=vision_depth)} if vision_depth else {}))


def prompt(config: VambaConfig, tiny: bool) -> list[int]:
    if not tiny:
        return PROMPT_7B
    from vamba_hf.tiny import special_token_ids

    ids = special_token_ids()
    return ([ids["im_start_token_id"], 20, 21, ids["vision_start_token_id"], ids["vision_end_token_id"]]
            + list(range(30, 50)) + [ids["eos_token_id"], 21, ids["im_start_token_id"], 22, 21])


def video_inputs(config: VambaConfig, frames: int, tiny: bool, device, dtype):
    grid_h, grid_w = GRID_TINY if tiny else GRID_7B
    steps = frames // 2
    generator = torch.Generator("cpu").manual_seed(frames)
    pixels = torch.randn(steps * grid_h * grid_w, 3 * 2 * 14 * 14, generator=generator).to(device, dtype)
    return {"input_ids": torch.tensor([prompt(config, tiny)], device=device),
            "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[steps, grid_h, grid_w]], device=device)}


def build(config: VambaConfig, device, dtype) -> VambaForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device(device):
        model = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def device_map_for(config: VambaConfig, placement: str, gpus: int, dtype, gpu0_share: float) -> dict:
    """The device map (device indices) accelerate infers for `placement`, on a meta-device copy of the model."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory

    with init_empty_weights():
        meta = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    no_split = meta._no_split_modules
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    if placement == "balanced":
        total = {i: weights * 2 for i in range(gpus)}  # capacity is not the question here: the split is
        max_memory = get_balanced_memory(meta, max_memory=total, no_split_module_classes=no_split, dtype=dtype)
    else:
        max_memory = {0: int(weights * gpu0_share), **{i: weights for i in range(1, gpus)}}
    return infer_auto_device_map(meta, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def layer_split(device_map: dict, config: VambaConfig) -> dict:
    """Decoder layers per device (from the map's `model.layers.N` entries, or the parent that holds them)."""
    split = {}
    for layer in range(config.num_hidden_layers):
        name = f"model.layers.{layer}"
        owner = next(key for key in sorted(device_map, key=len, reverse=True)
                     if key == "" or name == key or name.startswith(key + "."))
        split.setdefault(str(device_map[owner]), []).append(layer)
    return split


def cross_kv_on_layer_devices(model, cache) -> bool:
    return all(key.device == value.device == next(model.model.layers[i].parameters()).device
               for i, (key, value) in cross_kv_of(cache).items())


def greedy_steps(model, cache, token, steps: int):
    """`steps` greedy decoding steps from `cache` (the prefill's), one token each; returns the tokens."""
    tokens = []
    for _ in range(steps):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True).to(token.device)
        tokens.append(token)
    return tokens


def run_once(model, inputs, new_tokens: int, device) -> dict:
    """One prefill (the first token) and `new_tokens - 1` greedy steps from its cache: what `generate` does, without
    paying for a second prefill at these lengths."""
    with torch.inference_mode():
        reset_gpu_peaks()
        out, first = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device)
        cache = output_cache(out)
        on_devices = cross_kv_on_layer_devices(model, cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True).to(inputs["input_ids"].device)
        del out
        steps, decode_s = timed(lambda: greedy_steps(model, cache, token, new_tokens - 1), device)
    tokens = torch.cat([token, *steps], dim=1)[0].tolist()
    return {"first_token_s": round(first, 4), "decode_ms_per_token": round(decode_s / max(new_tokens - 1, 1) * 1e3, 3),
            "new_tokens": len(tokens), "peak_gib_per_gpu": gpu_peaks_gib(), "cross_kv_on_layer_device": on_devices,
            "tokens": tokens}


def warm_up(model, config, args, input_device, dtype) -> None:
    """A short video through prefill and a few steps: Triton autotuning, compilation and the CUDA graph's first
    capture happen here, not in a timed run."""
    inputs = video_inputs(config, 16, args.tiny, input_device, dtype)
    run_once(model, inputs, 3, "cpu")


def measure(model, config, frames: int, args, input_device, device, dtype, sink, label: dict):
    """`device`: what the timings synchronise."""
    record = {**label, "frames": frames}
    try:
        inputs = video_inputs(config, frames, args.tiny, input_device, dtype)
        record.update(run_once(model, inputs, args.new_tokens, device))
    except Exception as error:
        record.update(failure(error))
    sink.log(record)
    return record


def undispatch(model, device):
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
    return model.to(device)


def dispatch(model, device_map: dict, devices: list):
    from accelerate import dispatch_model

    named = {name: devices[index] for name, index in device_map.items()}
    return dispatch_model(model, named, force_hooks=True)


def compare(single: dict, multi: dict) -> dict:
    if "tokens" not in single or "tokens" not in multi:
        return {}
    a, b = single["tokens"], multi["tokens"]
    return {"tokens_equal_single_gpu": a == b,
            "first_difference": next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)}


def sweep_placements(config, counts, args, devices, dtype, sink, budget, label) -> None:
    """One GPU first for the counts it holds, then each placement over `devices`; tokens compared."""
    model = build(config, devices[0], dtype)
    warm_up(model, config, args, devices[0], dtype)
    singles = {}
    for frames in counts:
        if frames <= args.single_gpu_max_frames and not budget.spent():
            singles[frames] = measure(model, config, frames, args, devices[0], devices[0], dtype, sink,
                                      {**label, "placement": "one device"})
    for placement in args.placements.split(","):
        device_map = device_map_for(config, placement, args.gpus, dtype, args.gpu0_share)
        off_gpu = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
        if off_gpu:
            sink.log({**label, "placement": placement, "skipped": f"the map puts modules on {off_gpu}, not only "
                      "on the GPUs", "device_map": {name: str(d) for name, d in device_map.items()}})
            continue
        try:
            dispatch(model, device_map, devices)
        except Exception as error:
            sink.log({**label, "placement": placement, "dispatch": "failed", **failure(error)})
            model = undispatch(model, devices[0])
            continue
        warm_up(model, config, args, devices[0], dtype)
        sink.log({**label, "placement": placement, "device_map_layers": layer_split(device_map, config),
                  "device_map": {name: str(index) for name, index in device_map.items()}})
        for frames in counts:
            if budget.spent():
                sink.log({**label, "placement": placement, "frames": frames, "skipped": "budget spent"})
                continue
            record = measure(model, config, frames, args, devices[0], sync_device(devices), dtype, sink,
                             {**label, "placement": placement})
            if frames in singles:
                sink.log({**label, "placement": placement, "frames": frames, **compare(singles[frames], record)})
        model = undispatch(model, devices[0])
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync_device(devices: list) -> str:
    """What `timed` synchronises: every GPU (a device without an index) or the CPU."""
    return "cuda" if devices[0].startswith("cuda") else "cpu"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, frames="8192,16384")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--gpu0-share", type=float, default=0.35,
                        help="GPU 0's share of the weights in the max-memory placement's max_memory")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--single-gpu-max-frames", type=int, default=8192)
    parser.add_argument("--fp32-frames", type=int, default=1024)
    parser.add_argument("--fp32-layers", type=int, default=4)
    args = parser.parse_args()
    unknown = set(args.placements.split(",")) - set(PLACEMENTS)
    if unknown:
        parser.error(f"--placements: unknown {sorted(unknown)}; choose from {', '.join(PLACEMENTS)}")
    if not 0 < args.gpu0_share < 1:
        parser.error(f"--gpu0-share {args.gpu0_share}: give a fraction between 0 and 1")
    if args.gpus < 2:
        parser.error(f"--gpus {args.gpus}: give 2 or more (one GPU is bench_vamba.py's job)")
    if args.tiny:
        if args.frames == parser.get_default("frames"):
            args.frames = "8,16"
        args.fp32_frames, args.new_tokens, args.single_gpu_max_frames = 8, min(args.new_tokens, 4), 16
    return args


def main() -> None:
    args = parse_args()
    counts = frame_counts(args.frames)
    if not args.tiny and torch.cuda.device_count() < args.gpus:
        print(f"bench_multi_gpu: --gpus {args.gpus} asked, but this machine has {torch.cuda.device_count()} CUDA "
              "device(s); nothing was run", file=sys.stderr, flush=True)
        raise SystemExit(2)
    budget = Budget(args.budget_s)
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    devices = ["cpu"] * args.gpus if args.tiny else [f"cuda:{i}" for i in range(args.gpus)]
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sweep_placements(model_config(args.tiny), counts, args, devices, dtype, sink, budget,
                     {"config": "tiny" if args.tiny else "7B", "dtype": str(dtype).split(".")[-1]})
    if not budget.spent():
        small = model_config(args.tiny, num_hidden_layers=args.fp32_layers, vision_depth=args.fp32_layers)
        sweep_placements(small, [args.fp32_frames], args, devices, torch.float32, sink, budget,
                         {"config": f"{args.fp32_layers} layers", "dtype": "float32"})
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
