"""Quantized Vamba beside quantized Qwen2-VL-7B (transformers' own model) on one GPU: peak memory, first token and
decode ms/token per precision, and each precision's error against bf16 where it is meaningful (the vision tower's
output, the text's hidden states after the first decoder layers). Random weights at 7B sizes, 640x360 frames
(grid 26x46 per temporal step), greedy `generate` with the fast paths on (mamba-ssm kernels where installed, the
CUDA-graph decoding step).

    PYTHONPATH=src python benchmarks/bench_quantized.py --out benchmarks/results --frames 512,1024 \\
        --qwen-frames 512 --budget-s 330

Precisions (--precisions, in this order; each a torchao config applied by `torchao.quantization.quantize_` to every
nn.Linear but `lm_head`, the selection transformers' TorchAoConfig makes on Vamba: its declared full-precision
parameters are no Linear weights):
  bf16        the baseline
  float8      Float8DynamicActivationFloat8WeightConfig(PerRow()) (sm89+)
  int8+fp8kv  Int8WeightOnlyConfig with Vamba's float8 cross-attention K/V cache (cross_kv_cache_dtype); Qwen2-VL
              has no such cache: it runs plain int8
  int8        Int8WeightOnlyConfig
  int4        Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d") (tinygemm)
  int4+fp8kv  int4 with the float8 cross K/V cache (Vamba only)
`--int4-frames` caps int4's frame counts (its kernel is made for few rows; prefill rows are many): int4 runs at the
--frames up to it, or at it when none is. Each
measurement: one warm-up `generate`, then --repeats timed ones; the first token is the time from the call to the
first logits processor call, decode ms/token the median gap between later calls (each call synchronises the GPU).
The model is rebuilt from seed 0 for each precision, so every precision quantizes the same weights. `--tiny` runs
bf16 (as fp32) and int8 at tiny sizes on the CPU, for the test suite.
"""

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import GIB, Budget, ResultSink, failure, frame_counts, relative, start_run, synchronize  # noqa: E402
from bench_vamba import PROMPT_7B  # noqa: E402

from vamba_hf import VambaConfig, VambaForConditionalGeneration  # noqa: E402

PRECISIONS = ("bf16", "float8", "int8+fp8kv", "int8", "int4", "int4+fp8kv")
QWEN_VIDEO_TOKEN = 151656
VISION_START, VISION_END = 151652, 151653
HIDDEN_LAYERS_COMPARED = 4  # the text's hidden states after the first decoder layers (up to 4)


def first_layers(hidden_states) -> range:
    """Indices of the hidden states after the first decoder layers (index i: the output of layer i - 1), short of
    the last layer's, which follows the final norm."""
    return range(1, min(HIDDEN_LAYERS_COMPARED, len(hidden_states) - 2) + 1)


def torchao_config(precision: str):
    """The torchao config of `precision` (None for the baseline)."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow)

    weights = precision.split("+")[0]
    if weights in ("bf16", "fp32"):
        return None
    if weights == "float8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if weights == "int8":
        return Int8WeightOnlyConfig()
    if weights == "int4":
        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    raise SystemExit(f"--precisions: unknown {precision!r}; choose from {', '.join(PRECISIONS)}")


def quantize(model, precision: str) -> None:
    """Quantize every nn.Linear of `model` but lm_head, in place."""
    config = torchao_config(precision)
    if config is None:
        return
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=lambda module, name: isinstance(module, nn.Linear) and name != "lm_head")


# -- the two models ------------------------------------------------------------------------------------------------


class VambaUnderTest:
    name = "vamba"

    def __init__(self, tiny: bool, device, dtype):
        self.tiny, self.device, self.dtype = tiny, device, dtype
        self.grid_h, self.grid_w = (4, 4) if tiny else (26, 46)

    def build(self, precision: str):
        if self.tiny:
            from vamba_hf.demo import demo_config
            from vamba_hf.tiny import build_tiny_tokenizer

            config = demo_config(build_tiny_tokenizer())
        else:
            config = VambaConfig()
        config.cross_kv_cache_dtype = "float8_e4m3fn" if precision.endswith("+fp8kv") else None
        torch.manual_seed(0)
        with self.device:
            model = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=self.dtype)
        return model.eval()

    def prompt(self, model) -> list:
        if not self.tiny:
            return PROMPT_7B
        config = model.config
        return [5, 6, config.vision_start_token_id, config.vision_end_token_id] + list(range(30, 50))

    def inputs(self, model, frames: int) -> dict:
        steps = frames // 2
        generator = torch.Generator(self.device).manual_seed(frames)
        pixels = torch.randn(steps * self.grid_h * self.grid_w, 3 * 2 * 14 * 14, device=self.device,
                             dtype=self.dtype, generator=generator)
        grid = torch.tensor([[steps, self.grid_h, self.grid_w]], device=self.device)
        ids = torch.tensor([self.prompt(model)], device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels,
                "video_grid_thw": grid}

    def stages(self, model, inputs) -> dict:
        """The vision tower's output and the text's hidden states after the first decoder layers."""
        vision = torch.cat(model.encode_visual(inputs["pixel_values_videos"], inputs["video_grid_thw"]))
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states
        return {"vision": vision, **{f"hidden_{i}": hidden[i] for i in first_layers(hidden)}}

    def facts(self, model) -> dict:
        return {"mamba_backend": model.mamba_backend, "decode_graph": model.config.decode_with_cuda_graph,
                "cross_kv_cache_dtype": model.config.cross_kv_cache_dtype}


class QwenUnderTest(VambaUnderTest):
    """transformers' Qwen2-VL at Qwen2-VL-7B's sizes (those of benchmarks/bench_qwen2vl.py), SDPA."""

    name = "qwen2-vl"

    def build(self, precision: str):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        if self.tiny:
            text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=152064,
                        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        else:
            text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                        rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
            vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, vision_start_token_id=VISION_START,
                               vision_end_token_id=VISION_END, image_token_id=151655, video_token_id=QWEN_VIDEO_TOKEN)
        torch.manual_seed(0)
        with self.device:
            model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=self.dtype)
        return model.eval()

    def inputs(self, model, frames: int) -> dict:
        inputs = super().inputs(model, frames)
        tokens = frames // 2 * (self.grid_h // 2) * (self.grid_w // 2)
        ids = [151644, 8948, 198, VISION_START] + [QWEN_VIDEO_TOKEN] * tokens + [VISION_END] + list(range(1000, 1020))
        ids = torch.tensor([ids + [151645, 198, 151644, 77091, 198]], device=self.device)
        inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            inputs["mm_token_type_ids"] = (ids == QWEN_VIDEO_TOKEN).int() * 2
        return inputs

    def stages(self, model, inputs) -> dict:
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        features = getattr(features, "pooler_output", features)  # an output object on later transformers
        vision = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        text = inputs["input_ids"][0] != QWEN_VIDEO_TOKEN  # compared on the text positions, as Vamba's
        hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states
        return {"vision": vision, **{f"hidden_{i}": hidden[i][:, text] for i in first_layers(hidden)}}

    def facts(self, model) -> dict:
        return {}


# -- measurements --------------------------------------------------------------------------------------------------


class StepClock:
    """A logits processor that records when each generated token's logits are ready (the GPU synchronised)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, inputs, new_tokens: int, device):
    """(generated ids, seconds to the first token, ms per later token, peak GiB)."""
    from transformers import LogitsProcessorList

    clock = StepClock(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    ids = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         logits_processor=LogitsProcessorList([clock]))
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # the second step still warms the graph
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return ids[0, inputs["input_ids"].shape[1]:], clock.times[0] - start, statistics.median(gaps) * 1e3, peak


def measure(subject, model, precision, frames, args, reference_ids, sink) -> dict:
    inputs = subject.inputs(model, frames)
    record = {"model": subject.name, "precision": precision, "frames": frames, "repeats": args.repeats}
    with torch.inference_mode():
        timed_generate(model, inputs, 4, subject.device)  # warm-up: autotuning, compiling, the graph's capture
        runs = [timed_generate(model, inputs, args.decode_steps + 2, subject.device) for _ in range(args.repeats)]
    ids = runs[0][0]
    record.update(first_token_s=statistics.median(r[1] for r in runs), decode_ms=statistics.median(r[2] for r in runs),
                  peak_gib=max(r[3] for r in runs) if runs[0][3] is not None else None, tokens=ids.tolist())
    reference = reference_ids.get((subject.name, frames))
    if reference is None and precision in ("bf16", "fp32"):
        reference_ids[(subject.name, frames)] = ids
    elif reference is not None:
        record["greedy_agreement_vs_unquantized"] = (ids == reference).float().mean().item()
    return sink.log(record)


def stage_errors(subject, model, precision, frames, references, sink) -> None:
    with torch.inference_mode():
        stages = subject.stages(model, subject.inputs(model, frames))
        stages = {name: value.float().cpu() for name, value in stages.items()}
    if precision in ("bf16", "fp32"):
        references[subject.name] = stages
        return
    reference = references.get(subject.name)
    if reference is not None:
        sink.log({"model": subject.name, "precision": precision, "error_frames": frames,
                  **{f"{name}_relative_vs_unquantized": relative(stages[name], reference[name]) for name in stages}})


def run_precision(subject, precision, frames_list, args, references, reference_ids, sink, budget) -> None:
    device = subject.device
    build_started = time.perf_counter()
    model = subject.build(precision)
    quantize(model, precision)
    synchronize(device)
    setup = {"model": subject.name, "precision": precision, "build_and_quantize_s": time.perf_counter() - build_started}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        setup["weights_gib"] = torch.cuda.memory_allocated() / GIB
    sink.log({**setup, **subject.facts(model)})
    try:
        stage_errors(subject, model, precision, args.error_frames, references, sink)
    except Exception as error:  # noqa: BLE001 - reported, and the timings still run
        sink.log({"model": subject.name, "precision": precision, "error_frames": args.error_frames, **failure(error)})
    if precision.startswith("int4"):
        frames_list = [frames for frames in frames_list if frames <= args.int4_frames] or [args.int4_frames]
    for frames in frames_list:
        if budget.spent():
            sink.log({"model": subject.name, "precision": precision, "frames": frames, "skipped": "budget spent"})
            continue
        try:
            measure(subject, model, precision, frames, args, reference_ids, sink)
        except Exception as error:  # noqa: BLE001 - an OOM or a kernel's refusal is a result; go on
            sink.log({"model": subject.name, "precision": precision, "frames": frames, **failure(error)})
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the result file")
    parser.add_argument("--precisions", default="bf16,float8,int8+fp8kv,int8,int4")
    parser.add_argument("--qwen-precisions", default="bf16,float8,int8,int4")
    parser.add_argument("--frames", default="512,1024")
    parser.add_argument("--qwen-frames", default="512")
    parser.add_argument("--int4-frames", type=int, default=512,
                        help="int4 runs at the --frames up to this, or at this when none is")
    parser.add_argument("--error-frames", type=int, default=64, help="frames of the stage-error comparison")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds of wall clock")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU, fp32 and int8, for the test suite")
    args = parser.parse_args()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.precisions = args.qwen_precisions = "fp32,int8"
        args.frames = args.qwen_frames = "4"
        args.error_frames, args.repeats, args.decode_steps = 4, 1, 3
    elif not torch.cuda.is_available():
        raise SystemExit("bench_quantized: no CUDA device; run with --tiny for the CPU smoke run")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    budget = Budget(args.budget_s)
    references, reference_ids = {}, {}
    for subject, precisions, frames in ((VambaUnderTest(args.tiny, device, dtype), args.precisions, args.frames),
                                        (QwenUnderTest(args.tiny, device, dtype), args.qwen_precisions,
                                         args.qwen_frames)):
        for precision in filter(None, precisions.split(",")):  # an empty list leaves that model out
            if budget.spent():
                sink.log({"model": subject.name, "precision": precision, "skipped": "budget spent"})
                continue
            try:
                run_precision(subject, precision, frame_counts(frames), args, references, reference_ids, sink,
                              budget)
            except Exception as error:  # noqa: BLE001 - e.g. a precision this GPU cannot run
                sink.log({"model": subject.name, "precision": precision, **failure(error)})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
