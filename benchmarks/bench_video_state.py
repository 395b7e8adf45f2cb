"""A video encoded once (`VideoState`): what a second question and a few more frames cost. Random weights at 7B
sizes, bf16, SDPA, 640x360 frames (299 visual tokens per 2 frames), random pixels, one GPU.

    PYTHONPATH=src python benchmarks/bench_video_state.py --out bench_out

One JSON line per measurement:
  question   at each of --frames: `full_prefill_s`, the first token of a question from the pixels (vision tower,
             every Mamba-2 block, the prompt); `encode_s`, `model.encode_video`; `second_question_first_token_ms`,
             the first token of another question from the state (the median of --repeats) and how far its logits
             are from the full prefill's (`logits_relative_diff`); the state's `state_gib` in memory, and for
             frame counts up to --save-max-frames its size on disk (`file_gib`) and the seconds to save and load it.
  extend     at each of --history-frames and --extend-frames: `extend_ms`, the median of --repeats chained
             `model.extend_video` calls adding that many frames to a state of that history (room reserved at
             encoding, so none reallocates), and `first_token_ms` of a question after them.
Timings follow one warm-up on a short video. `--tiny` runs the same path on CPU at tiny sizes (the test suite).
"""

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    GIB,
    Budget,
    ResultSink,
    add_common_arguments,
    failure,
    frame_counts,
    gpu_peaks_gib,
    median,
    relative,
    reset_gpu_peaks,
    start_run,
    timed,
)

from vamba_hf import VambaConfig, VambaForConditionalGeneration  # noqa: E402
from vamba_hf.video_state_vamba import load_video_state  # noqa: E402

GRID_7B, GRID_TINY = (26, 46), (4, 4)
# <|im_start|>system ... <|vision_start|><|vision_end|> 20 text tokens <|im_end|> <|im_start|>assistant
QUESTIONS_7B = [[151644, 8948, 198, 151652, 151653] + list(range(start, start + 20)) + [151645, 198, 151644, 77091,
                                                                                        198] for start in (1000, 2000)]


def model_config(tiny: bool) -> VambaConfig:
    if tiny:
        from vamba_hf.demo import demo_config
        from vamba_hf.tiny import build_tiny_tokenizer

        return demo_config(build_tiny_tokenizer())
    return VambaConfig()


def questions(config: VambaConfig, tiny: bool) -> list[list[int]]:
    if not tiny:
        return QUESTIONS_7B
    start, end = config.vision_start_token_id, config.vision_end_token_id
    return [[20, 21, start, end] + list(range(first, first + 12)) + [22, 21] for first in (30, 60)]


def video(frames: int, tiny: bool, device, dtype, seed: int = 0):
    """Random pixels of `frames` frames and their grid."""
    grid_h, grid_w = GRID_TINY if tiny else GRID_7B
    steps = frames // 2
    generator = torch.Generator(device).manual_seed(seed * 100003 + frames)
    pixels = torch.randn(steps * grid_h * grid_w, 3 * 2 * 14 * 14, generator=generator, device=device, dtype=dtype)
    return pixels, torch.tensor([[steps, grid_h, grid_w]], device=device)


def build(config: VambaConfig, device, dtype) -> VambaForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device(device):
        model = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def first_token(model, question: list[int], device, **visual) -> torch.Tensor:
    """The first answer token's logits of `question` (one forward with a cache, the last position only)."""
    ids = torch.tensor([question], device=device)
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **visual).logits


def measure_question(model, frames: int, args, device, dtype, work: Path) -> dict:
    first, second = questions(model.config, args.tiny)
    pixels, grid = video(frames, args.tiny, device, dtype)
    record = {}
    from_pixels, record["full_prefill_s"] = timed(
        lambda: first_token(model, second, device, pixel_values_videos=pixels, video_grid_thw=grid), device)
    gc.collect()
    state, record["encode_s"] = timed(lambda: model.encode_video(pixels, grid), device)
    del pixels
    first_token(model, first, device, video_state=state)  # the first question
    times = [timed(lambda: first_token(model, second, device, video_state=state), device)[1]
             for _ in range(args.repeats)]
    record["second_question_first_token_ms"] = round(1000 * median(times), 2)
    record["logits_relative_diff"] = relative(first_token(model, second, device, video_state=state), from_pixels)
    record["state_bytes"] = state.nbytes()
    record["state_gib"] = round(state.nbytes() / GIB, 3)
    if frames <= args.save_max_frames:
        path = work / f"state-{frames}.safetensors"
        _, record["save_s"] = timed(lambda: state.save(path), device)
        record["file_bytes"] = path.stat().st_size
        record["file_gib"] = round(record["file_bytes"] / GIB, 3)
        loaded, record["load_s"] = timed(lambda: load_video_state(path, model, device=device), device)
        path.unlink()
        del loaded
    record["gpu_peak_gib"] = gpu_peaks_gib()
    return record


def measure_extend(model, history: int, new_frames: int, args, device, dtype) -> dict:
    pixels, grid = video(history, args.tiny, device, dtype)
    state = model.encode_video(pixels, grid, reserve_frames=new_frames * (args.repeats + 1))
    del pixels
    gc.collect()
    additions = [video(new_frames, args.tiny, device, dtype, seed=seed + 1) for seed in range(args.repeats + 1)]
    state = model.extend_video(state, *additions[0])  # warm-up at this size
    times = []
    for new_pixels, new_grid in additions[1:]:
        state, seconds = timed(lambda: model.extend_video(state, new_pixels, new_grid), device)
        times.append(seconds)
    _, after = timed(lambda: first_token(model, questions(model.config, args.tiny)[1], device, video_state=state),
                     device)
    return {"extend_ms": round(1000 * median(times), 2), "extend_max_ms": round(1000 * max(times), 2),
            "first_token_ms": round(1000 * after, 2), "state_bytes": state.nbytes(),
            "state_gib": round(state.nbytes() / GIB, 3),
            "gpu_peak_gib": gpu_peaks_gib()}


def warm_up(model, args, device, dtype) -> None:
    pixels, grid = video(8, args.tiny, device, dtype)
    state = model.encode_video(pixels, grid, reserve_frames=2)
    first_token(model, questions(model.config, args.tiny)[0], device, pixel_values_videos=pixels, video_grid_thw=grid)
    first_token(model, questions(model.config, args.tiny)[0], device, video_state=state)
    model.extend_video(state, *video(2, args.tiny, device, dtype, seed=1))


def run(label: dict, fn, sink, budget: Budget) -> None:
    if budget.spent():
        sink.log({**label, "skipped": "budget"})
        return
    reset_gpu_peaks()
    try:
        with torch.no_grad():
            sink.log({**label, **fn()})
    except Exception as error:  # noqa: BLE001 - one measurement's failure is reported, the others still run
        sink.log({**label, **failure(error)})
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, frames="1024,4096")
    parser.add_argument("--history-frames", default="1024,8192", help="comma-separated histories to extend")
    parser.add_argument("--extend-frames", default="2,64", help="comma-separated frame counts added per extension")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--save-max-frames", type=int, default=1024,
                        help="save and load the state for frame counts up to this (the file of 4096 frames is 35 GB)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the saved states (default: a temporary one)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more")
    if args.tiny:
        for name, tiny in (("frames", "8,16"), ("history_frames", "8,16"), ("extend_frames", "2,4")):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, tiny)
        args.repeats = min(args.repeats, 3)
    return args


def main() -> None:
    args = parse_args()
    counts, histories, additions = (frame_counts(text) for text in (args.frames, args.history_frames,
                                                                      args.extend_frames))
    if not args.tiny and not torch.cuda.is_available():
        print("bench_video_state: no CUDA device; run with --tiny on the CPU", file=sys.stderr, flush=True)
        raise SystemExit(2)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    budget = Budget(args.budget_s)
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    model = build(model_config(args.tiny), device, dtype)
    base = {"config": "tiny" if args.tiny else "7B", "dtype": str(dtype).split(".")[-1],
            "mamba_backend": model.mamba_backend}
    with torch.no_grad():
        warm_up(model, args, device, dtype)
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        for frames in counts:
            run({**base, "measure": "question", "frames": frames},
                lambda: measure_question(model, frames, args, device, dtype, Path(scratch)), sink, budget)
    for history in histories:
        for new_frames in additions:
            run({**base, "measure": "extend", "history_frames": history, "extend_frames": new_frames},
                lambda: measure_extend(model, history, new_frames, args, device, dtype), sink, budget)
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
