"""The CUDA kernels (mamba-ssm + causal-conv1d) against the PyTorch path, on the GPU.

    PYTHONPATH=src python benchmarks/check_kernels.py --golden path/to/golden --out bench_out

Checks (one JSON line each; relative errors are ||a - b|| / ||b||):
  golden        on each golden fixture (the original implementation's tiny models, `--golden DIR`), in fp32 and
                bf16: logits with the kernels vs with the PyTorch path, and vs the reference logits
  decode graph  on the golden fixtures, fp32: greedy generation with each decoding step replayed from a CUDA graph
                vs run eagerly (tokens equal, scores' difference); CUDA only
  7B layer      two decoder layers at 7B sizes, random weights, bf16, 8192 visual tokens: logits and the Mamba-2
                block's output with the kernels vs the PyTorch path; the scan in segments of 2048 tokens vs whole
  segments      the Mamba-2 block at 2048 and 4096 frames (299 visual tokens per 2 frames): segments of 2**15
                tokens vs the longest segment the kernels allow
Without the kernels (no CUDA, or mamba-ssm not installed) both sides run the PyTorch path; each line names the
backend that ran. `--tiny` runs every check at tiny sizes on CPU (for the test suite).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    Budget,
    ResultSink,
    attributes_set,
    relative,
    start_run,
)

from vamba_hf import VambaConfig, VambaForConditionalGeneration  # noqa: E402
from vamba_hf.mamba2_vamba import Mamba2, kernels_unavailable_reason  # noqa: E402

GOLDEN_CASES = ("video_short", "video_long", "image")
TOKENS_PER_STEP = 13 * 23  # 640x360 frames: a 26x46 patch grid, merged 2x2, per temporal step of 2 frames
CHECKS = ("golden", "decode-graph", "layer", "segments")


class Kernels:
    """Turns the Mamba-2 kernels of every block of `model` on or off for a block, and restores each block's own
    setting after it."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.mixers = [m for m in model.modules() if isinstance(m, Mamba2)]
        self.enabled = enabled

    def __enter__(self):
        self.saved = [m.use_kernels for m in self.mixers]
        for mixer in self.mixers:
            mixer.use_kernels = self.enabled

    def __exit__(self, *exc):
        for mixer, saved in zip(self.mixers, self.saved):
            mixer.use_kernels = saved
        return False


def backend_name(device) -> str:
    return kernels_unavailable_reason(torch.device(device)) or "mamba-ssm + causal-conv1d"


def load_golden(folder: Path, device, dtype):
    from safetensors.torch import load_file

    model = VambaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval()
    inputs = {k: v.to(device) for k, v in load_file(folder / "inputs.safetensors").items()}
    for name in ("pixel_values", "pixel_values_videos"):
        if name in inputs:
            inputs[name] = inputs[name].to(dtype)
    return model, inputs, load_file(folder / "reference_outputs.safetensors")


def golden_parity(root: Path, device, sink) -> None:
    for case in GOLDEN_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            model, inputs, reference = load_golden(root / case, device, dtype)
            logits = {}
            with torch.inference_mode():
                for kernels in (True, False):
                    with Kernels(model, kernels):
                        logits[kernels] = model(**inputs, use_cache=False).logits
            sink.log({"check": "golden", "case": case, "dtype": str(dtype).split(".")[-1],
                      "kernel_backend": backend_name(device),
                      "kernel_vs_torch_logits": relative(logits[True], logits[False]),
                      "kernel_vs_reference_logits": relative(logits[True].cpu(), reference["logits"])})


def golden_decode_graph(root: Path, device, sink) -> None:
    if torch.device(device).type != "cuda":
        sink.log({"check": "decode graph (golden, fp32)", "skipped": "the CUDA-graph decoding step needs CUDA"})
        return
    for case in GOLDEN_CASES:
        model, inputs, reference = load_golden(root / case, device, torch.float32)
        runs = {}
        with torch.inference_mode():
            for graph in (True, False):
                with attributes_set(model.config, decode_with_cuda_graph=graph):
                    runs[graph] = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_scores=True,
                                                 return_dict_in_generate=True)
        sink.log({"check": "decode graph (golden, fp32)", "case": case,
                  "tokens_equal": bool(torch.equal(runs[True].sequences, runs[False].sequences)),
                  "tokens_equal_reference": bool(torch.equal(runs[True].sequences.cpu(), reference["generated_ids"])),
                  "graph_vs_eager_scores": relative(torch.stack(runs[True].scores), torch.stack(runs[False].scores))})


def layer_config(tiny: bool) -> VambaConfig:
    """Two decoder layers at 7B sizes (a small vocabulary and vision tower: they are not under test); at tiny sizes
    for `--tiny`."""
    if tiny:
        return VambaConfig(num_hidden_layers=2, vocab_size=2048, vision_start_token_id=1, vision_end_token_id=2,
                           hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           mrope_section=[2, 3, 3], vision_config=dict(depth=1, embed_dim=32, hidden_size=64,
                                                                       num_heads=2, mlp_ratio=2),
                           vision_mamba_mixer_config=dict(hidden_dim=64, d_state=16, headdim=16, chunk_size=16))
    return VambaConfig(num_hidden_layers=2, vocab_size=2048, vision_start_token_id=1, vision_end_token_id=2,
                       vision_config=dict(depth=1))


def build(config: VambaConfig, device, dtype) -> VambaForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device(device):
        model = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def layer_parity(device, dtype, tokens: int, segment: int, tiny: bool, sink) -> None:
    """Layer 0 runs its Mamba-2 block, layer 1's cross-attention reads it."""
    config = layer_config(tiny)
    model = build(config, device, dtype)
    generator = torch.Generator(device).manual_seed(1)
    visual = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype, generator=generator)
    ids = torch.randint(3, config.vocab_size, (1, 32), device=device, generator=generator)
    ids[0, 1:3] = torch.tensor([config.vision_start_token_id, config.vision_end_token_id])
    block = model.model.layers[0].vision_mixer
    out = {}
    with torch.inference_mode():
        for kernels in (True, False):
            with Kernels(model, kernels):
                out[kernels] = (model(input_ids=ids, visual_embeds=[visual[0]], use_cache=False).logits,
                                block(visual.clone()))
                with attributes_set(block.mixer, max_tokens=segment):
                    out[kernels, "segmented"] = block.mixer(block.norm(visual))
                out[kernels, "whole"] = block.mixer(block.norm(visual))
    sink.log({"check": "7B layer" if not tiny else "tiny layer", "dtype": str(dtype).split(".")[-1],
              "kernel_backend": backend_name(device), "visual_tokens": tokens,
              "kernel_vs_torch_logits": relative(out[True][0], out[False][0]),
              "kernel_vs_torch_mamba_block": relative(out[True][1], out[False][1]),
              f"torch_segmented_{segment}_vs_kernel": relative(out[False, "segmented"], out[True, "whole"]),
              f"kernel_segmented_{segment}_vs_unsegmented": relative(out[True, "segmented"], out[True, "whole"])})


def long_segment_parity(device, dtype, frames_list, short: int, tiny: bool, sink, budget: Budget) -> None:
    """The Mamba-2 block at each frame count: segments of `short` tokens vs the longest segment allowed."""
    config = layer_config(tiny)
    model = build(config, device, dtype)
    block = model.model.layers[0].vision_mixer
    generator = torch.Generator(device).manual_seed(2)
    for frames in frames_list:
        if budget.spent():
            sink.log({"check": "segments", "frames": frames, "skipped": "budget spent"})
            continue
        tokens = frames // 2 * TOKENS_PER_STEP
        record = {"check": "segments", "frames": frames, "visual_tokens": tokens, "dtype": str(dtype).split(".")[-1],
                  "kernel_backend": backend_name(device)}
        try:
            visual = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype, generator=generator)
            outs, lengths = {}, []
            with torch.inference_mode():
                for max_tokens in (short, 2**40):
                    with attributes_set(block.mixer, max_tokens=max_tokens):
                        lengths.append(block.mixer.segment_length(1))
                        outs[max_tokens] = block(visual.clone(), in_place=True)
            record.update(segment_tokens=lengths, relative=relative(outs[short], outs[2**40]),
                          finite=bool(outs[short].isfinite().all()))
        except torch.OutOfMemoryError:
            record["oom"] = True
        visual = outs = None
        sink.log(record)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the result file")
    parser.add_argument("--golden", type=Path, default=None,
                        help="folder of the golden fixtures (video_short/, video_long/, image/); without it the "
                             "golden checks are skipped")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, from {', '.join(CHECKS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new checks after this many seconds of wall clock")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU, for the test suite (seconds)")
    args = parser.parse_args()
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--checks: unknown {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    if args.golden is not None and not (args.golden / GOLDEN_CASES[0] / "config.json").is_file():
        parser.error(f"--golden {args.golden}: no {GOLDEN_CASES[0]}/config.json there; give the golden fixtures' "
                     "folder")
    return args


def main() -> None:
    args = parse_args()
    budget = Budget(args.budget_s)
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    checks = args.checks.split(",")
    if args.tiny:
        layer = dict(dtype=torch.float32, tokens=512, segment=64)
        segments = dict(dtype=torch.float32, frames_list=(4, 8), short=128)
    else:
        layer = dict(dtype=torch.bfloat16, tokens=8192, segment=2048)
        segments = dict(dtype=torch.bfloat16, frames_list=(2048, 4096), short=2**15)
    steps = {
        "golden": lambda: golden_parity(args.golden, device, sink),
        "decode-graph": lambda: golden_decode_graph(args.golden, device, sink),
        "layer": lambda: layer_parity(device, tiny=args.tiny, sink=sink, **layer),
        "segments": lambda: long_segment_parity(device, tiny=args.tiny, sink=sink, budget=budget, **segments),
    }
    for name in checks:
        if budget.spent():
            sink.log({"check": name, "skipped": "budget spent"})
        elif name in ("golden", "decode-graph") and args.golden is None:
            sink.log({"check": name, "skipped": "no --golden DIR given"})
        else:
            try:
                steps[name]()
            except torch.OutOfMemoryError:
                sink.log({"check": name, "oom": True})
        if device == "cuda":
            torch.cuda.empty_cache()
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
