"""Vamba split over several GPUs with `device_map="auto"` generates the same greedy tokens as on one GPU.

    python examples/multi_gpu_generate.py --model ./Vamba-Qwen2-VL-7B-hf --video clip.mp4 --gpus 2
    python examples/multi_gpu_generate.py        # the embedded demo model and a synthetic clip (same as --tiny)

With fewer GPUs than --gpus (or none), it says so and runs both loads on the one device there is: the script is
checked, the split is not.

The one-device run goes first; then the model is loaded with `device_map="auto"` and a per-GPU memory cap of
about 1/--gpus of its weights, so that accelerate spreads the decoder layers (and the vision tower) over the GPUs.
Prints one JSON line: the tokens of both runs, whether they are equal, and the devices the split model used.
Exits with status 1 when the tokens differ.
"""

import argparse
import importlib.util
import json
import math
import sys

import torch

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.processing_vamba import VambaProcessor


def model_and_video(args):
    """The checkpoint and the video (a path, or with --tiny the demo clip's frames: no video decoder needed)."""
    if args.model:
        return args.model, args.video
    from vamba_hf.demo import build_demo_model_dir, demo_frames

    return str(build_demo_model_dir()), demo_frames()


def prompt_inputs(processor, video: str, question: str, num_frames):
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", num_frames=num_frames)


def greedy(model, inputs, max_new_tokens: int) -> list[int]:
    device = model.get_input_embeddings().weight.device
    inputs = {name: value.to(device) for name, value in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def split_memory_caps(model_bytes: int, gpus: int) -> dict:
    """A cap per GPU (bytes) above an even share, so that `device_map="auto"` has to use every GPU; the last GPU
    also takes what does not split evenly (one decoder layer at most), so that nothing is offloaded to disk."""
    share = math.ceil(model_bytes / gpus * 1.25)
    return {index: share if index < gpus - 1 else 2 * share for index in range(gpus)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="converted or official Vamba checkpoint (folder or Hub id)")
    parser.add_argument("--video", help="video file to ask about")
    parser.add_argument("--tiny", action="store_true",
                        help="the embedded tiny demo model and a synthetic clip (the default without --model)")
    parser.add_argument("--question", default="Describe the video.")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.tiny and args.model:
        parser.error("--tiny runs the demo model; drop it to use --model")
    if args.model and not args.video:
        parser.error("--model needs --video (without both, the demo model reads a synthetic clip)")
    return args


def announce_devices(gpus: int) -> None:
    if importlib.util.find_spec("accelerate") is None:
        sys.exit('This example needs accelerate for device_map="auto": pip install accelerate')
    available = torch.cuda.device_count()
    if available < gpus:
        where = f"{available} GPU" if available else "no GPU, only the CPU"
        print(f"--gpus {gpus}: this machine has {where}, so device_map=\"auto\" puts the whole model on one device; "
              f"both runs below use it. On a machine with {gpus} GPUs the decoder layers are split over them.",
              file=sys.stderr)


def main(argv=None) -> dict:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    announce_devices(args.gpus)
    model_path, video = model_and_video(args)
    processor = VambaProcessor.from_pretrained(model_path)
    inputs = prompt_inputs(processor, video, args.question, args.num_frames)

    single = VambaForConditionalGeneration.from_pretrained(model_path, dtype=dtype)
    single = single.to("cuda:0" if on_gpu else "cpu").eval()
    model_bytes = weights_bytes(single)
    one_device = greedy(single, inputs, args.max_new_tokens)
    del single
    if on_gpu:
        torch.cuda.empty_cache()

    caps = split_memory_caps(model_bytes, args.gpus) if on_gpu else None
    split = VambaForConditionalGeneration.from_pretrained(model_path, dtype=dtype, device_map="auto",
                                                          max_memory=caps).eval()
    device_map = getattr(split, "hf_device_map", None) or {"": split.device}  # unset when all is on one device
    devices = sorted({str(device) for device in device_map.values()})
    several = greedy(split, inputs, args.max_new_tokens)

    result = {"model": model_path, "one_device_tokens": one_device, "device_map_tokens": several,
              "equal": one_device == several, "devices": devices, "max_memory": caps}
    print(json.dumps(result), flush=True)
    if on_gpu and len(devices) < min(args.gpus, torch.cuda.device_count()):
        print(f"warning: the split used only {devices}", file=sys.stderr)
    if not result["equal"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
