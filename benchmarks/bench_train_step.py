"""One training step of Vamba next to transformers' Qwen2-VL-7B: time and peak memory, same video, same run.

Random weights at 7B sizes, bf16, SDPA, gradient checkpointing over every decoder layer and vision block, full
fine-tuning (every parameter trained). A step is forward + backward + an optimizer step; `--optimizer sgd` (the
default) keeps no optimizer state, so the peak is weights + gradients + activations (AdamW would add two more
copies of the weights: use FSDP or LoRA for it). The sample: one video of --frames frames at 640x360 (grid
26x46 patches per temporal step, 299 merged tokens per 2 frames: 38,272 visual tokens at 256 frames), a
30-token prompt and a 64-token supervised answer.

    PYTHONPATH=src python benchmarks/bench_train_step.py --frames 256          # one H100/H200
    PYTHONPATH=src python benchmarks/bench_train_step.py --tiny                # CPU smoke run at tiny sizes

Prints one JSON line per model (and writes them to --out): step_s (median of --repeats after one warm-up),
forward_backward_s, optimizer_s, peak_gib (CUDA), params, loss.
"""

import argparse
import gc
import inspect
import json
import statistics
import time

import torch

from vamba_hf import VambaConfig, VambaForConditionalGeneration

VISION_START, VISION_END, VIDEO_PAD = 151652, 151653, 151656
PROMPT_HEAD = [151644, 8948, 198, 151644, 872, 198]  # <|im_start|>system\n<|im_start|>user\n (abridged)
QUESTION = list(range(1000, 1020)) + [151645, 198, 151644, 77091, 198]
ANSWER_TOKENS = 64
GIB = 2**30

SEVEN_B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6),
    vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
    mrope_section=[16, 24, 24], grid=(26, 46),
)
TINY = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=152064),
    vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    mrope_section=[2, 3, 3], grid=(4, 4),
)


def vamba_model(sizes, device, dtype):
    mixer = dict(hidden_dim=sizes["text"]["hidden_size"])
    if sizes is TINY:
        mixer.update(d_state=16, headdim=16, chunk_size=8)
    config = VambaConfig(**sizes["text"], mrope_section=sizes["mrope_section"], vision_config=sizes["vision"],
                         vision_mamba_mixer_config=mixer, use_cache=False)
    with torch.device(device):
        return VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)


def qwen2vl_model(sizes, device, dtype):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(sizes["text"], rope_scaling={"type": "mrope", "mrope_section": sizes["mrope_section"]},
                use_cache=False)
    config = Qwen2VLConfig(text_config=text, vision_config=sizes["vision"], vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, image_token_id=151655, video_token_id=VIDEO_PAD)
    with torch.device(device):
        return Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)


def sample(model_name, frames, grid, device, dtype):
    """The same video and answer for both models; only the prompt's video placeholder differs (Qwen2-VL puts one
    pad token per visual token in the text, Vamba none)."""
    generator = torch.Generator().manual_seed(frames)
    steps, (height, width) = frames // 2, grid
    pixels = torch.randn(steps * height * width, 3 * 2 * 14 * 14, generator=generator).to(device, dtype)
    visual_tokens = steps * (height // 2) * (width // 2)
    placeholder = [VISION_START] + ([VIDEO_PAD] * visual_tokens if model_name == "qwen2-vl" else []) + [VISION_END]
    answer = torch.randint(1000, 30000, (ANSWER_TOKENS,), generator=generator).tolist()
    ids = PROMPT_HEAD + placeholder + QUESTION + answer
    labels = [-100] * (len(ids) - len(answer)) + answer
    inputs = {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device),
              "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[steps, height, width]], device=device)}
    return inputs, visual_tokens


def enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def measure(model_name, build, sizes, args, device, dtype) -> dict:
    torch.manual_seed(0)
    model = build(sizes, device, dtype).train()
    enable_checkpointing(model)
    inputs, visual_tokens = sample(model_name, args.frames, sizes["grid"], device, dtype)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers 5's Qwen2-VL
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == VIDEO_PAD).int() * 2
    optimizer_class = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=1e-6)
    record = {"model": model_name, "frames": args.frames, "visual_tokens": visual_tokens,
              "text_tokens": inputs["input_ids"].shape[1], "params": sum(p.numel() for p in model.parameters()),
              "dtype": str(dtype).removeprefix("torch."), "optimizer": args.optimizer, "device": device_name(device)}

    def forward_backward():
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach()

    steps, passes, updates = [], [], []
    try:
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            loss, pass_s = timed(forward_backward, device)
            _, update_s = timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)), device)
            if repeat:
                passes.append(pass_s)
                updates.append(update_s)
                steps.append(pass_s + update_s)
        record.update(step_s=statistics.median(steps), forward_backward_s=statistics.median(passes),
                      optimizer_s=statistics.median(updates), loss=loss.float().item())
        if device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    except torch.OutOfMemoryError:
        record["oom"] = True
    del model, optimizer, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 256; 8 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (runs on CPU in seconds)")
    parser.add_argument("--models", default="vamba,qwen2-vl", help="comma-separated: vamba, qwen2-vl")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.frames = args.frames or (8 if args.tiny else 256)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = TINY if args.tiny else SEVEN_B
    builders = {"vamba": vamba_model, "qwen2-vl": qwen2vl_model}
    records = []
    for name in args.models.split(","):
        record = measure(name, builders[name], sizes, args, device, dtype)
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as sink:
                sink.write(json.dumps(record) + "\n")
        records.append(record)
    return records


if __name__ == "__main__":
    main()
