"""Decoded frames -> model inputs on one device: our processor by default and with each `frame_resize` against
transformers' fast `Qwen2VLVideoProcessor` on the same frames and device, in one run.

    PYTHONPATH=src python benchmarks/bench_preprocess.py --out bench_out --frames 1024 [--device cuda]

The frames: `--frames` moving-gradient 640x360 uint8 frames (`--width`, `--height`), as a video decoder hands them
over; both processors resize them to the same patch grid (min_pixels 56*56, max_pixels 28*28*1280) and return
float32 patches on the device. Per frame count, one JSON line with, for ours by default (`ours_default_*`; which
resize the default is on this device in `default_frame_resize`) and with each `frame_resize` ("pil": PIL bicubic on
the CPU; "torch": PIL's resize in torch on the device), and for Qwen2-VL's video processor, the median of
`--repeats` runs after one warm-up (device synchronised), the most host memory a run added beyond the frames
(`*_rss_growth_gib`), and whether ours' pixels are the same in all three (`ours_pixels_equal`, bit for bit).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    Budget,
    PeakRss,
    ResultSink,
    add_common_arguments,
    failure,
    frame_counts,
    median,
    start_run,
    timed,
)

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def moving_frames(count: int, width: int, height: int) -> np.ndarray:
    rows, columns = np.mgrid[0:height, 0:width]
    base = np.stack([3 * columns, 4 * rows, columns + rows], axis=-1)
    return np.stack([(base + 5 * index) % 256 for index in range(count)]).astype(np.uint8)


def ours(processor, frames: np.ndarray, device, frame_resize):
    return processor(text="<|vision_start|><|vision_end|>", videos=frames, return_tensors="pt", device=str(device),
                     frame_resize=frame_resize, video_longest_edge=None, video_shortest_edge=None)


def qwen2_vl(video_processor, frames: np.ndarray, device):
    return video_processor(videos=[frames], return_tensors="pt", device=str(device), do_sample_frames=False)


def measure(fn, repeats: int, device) -> tuple:
    """(last output, median seconds, each run's seconds, the most host memory a run added (GiB), beyond the
    frames, which exist before it)"""
    fn()
    runs, growth = [], []
    for _ in range(repeats):
        with PeakRss() as rss:
            output, seconds = timed(fn, device)
        runs.append(seconds)
        growth.append(round(rss.peak_gib - rss.start_gib, 3))
    return output, median(runs), runs, max(growth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, frames="1024")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.tiny:
        args.width, args.height, args.repeats = 100, 60, 1  # not multiples of 28: both resize
    counts = frame_counts(args.frames)
    device = torch.device(args.device)
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    budget = Budget(args.budget_s)
    import transformers

    from vamba_hf.video_processing_vamba import default_frame_resize
    from vamba_hf.tiny import build_tiny_processor

    processor = build_tiny_processor()
    try:
        video_processor = transformers.Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    except ImportError as error:  # its fast processor needs torchvision
        video_processor, missing = None, str(error).strip().splitlines()[0]
    for count in counts:
        if budget.spent():
            sink.log({"frames": count, "skipped": "budget spent"})
            continue
        record = {"frames": count, "size": [args.width, args.height], "device": str(device), "repeats": args.repeats}
        try:
            frames = moving_frames(count, args.width, args.height)
            outputs = {}
            for frame_resize in (None, "pil", "torch"):
                name = frame_resize or "default"
                output, seconds, runs, growth = measure(lambda: ours(processor, frames, device, frame_resize),
                                                        args.repeats, device)
                outputs[name] = output["pixel_values_videos"].cpu()
                record[f"ours_{name}_s"], record[f"ours_{name}_runs_s"] = seconds, runs
                record[f"ours_{name}_rss_growth_gib"] = growth
            record["video_grid_thw"] = output["video_grid_thw"].tolist()
            if video_processor is None:
                record["qwen2_vl_skipped"] = missing
            else:
                output, seconds, runs, growth = measure(lambda: qwen2_vl(video_processor, frames, device),
                                                        args.repeats, device)
                record.update(qwen2_vl_s=seconds, qwen2_vl_runs_s=runs, qwen2_vl_rss_growth_gib=growth,
                              qwen2_vl_video_grid_thw=output["video_grid_thw"].tolist())
            record["default_frame_resize"] = default_frame_resize(device)
            record["ours_pixels_equal"] = all(torch.equal(outputs["pil"], other) for other in outputs.values())
        except Exception as error:
            record.update(failure(error))
        sink.log(record)
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
