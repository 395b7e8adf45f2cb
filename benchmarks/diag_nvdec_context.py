"""Diagnostic (GPU machine): NVDEC decoding (`decode_device="cuda"`) with FFmpeg in the device's primary CUDA context
(nothing made it before the decoder) and beside torch (torch made it first, as a model on the GPU does), each in a
fresh process: `load_video` times and whether the frames are the CPU decoder's.

    PYTHONPATH=src:benchmarks python benchmarks/diag_nvdec_context.py [--video FILE] [--frames 256] [--workers 4]

Without --video it writes a 2-minute 640x360 H.264 file (GOP 250) to /tmp with bench_end_to_end's writer. Prints one
JSON line per order: the runs' seconds, the device memory torch sees taken during them (torch first only), and
`same_as_cpu`.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import torch
from vamba_hf.video_vamba import VideoSampling, load_video

path, order, frames, workers, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
free_before = None
if order == "torch-first":
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
sampling = VideoSampling(num_frames=frames, decode_workers=workers)
seconds = []
for _ in range(runs):
    start = time.perf_counter()
    video = load_video(path, sampling, decode_device="cuda")
    seconds.append(time.perf_counter() - start)
taken = None if free_before is None else round((free_before - torch.cuda.mem_get_info()[0]) / 2**30, 3)
expected = load_video(path, sampling)
same = len(video.frames) == len(expected.frames) and all(
    np.array_equal(a, b) for a, b in zip(video.frames, expected.frames))
print(json.dumps({"order": order, "runs_s": seconds, "device_memory_taken_gib": taken, "same_as_cpu": same}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    path = args.video
    if path is None:
        from bench_end_to_end import write_video

        path = Path("/tmp/diag-nvdec-120s.mp4")
        write_video(path, 120, 24, 640, 360, 250, "ultrafast")
    for order in ("decoder-first", "torch-first"):
        result = subprocess.run([sys.executable, "-c", CHILD, str(path), order, str(args.frames), str(args.workers),
                                 str(args.runs)], capture_output=True, text=True, timeout=600)
        print(result.stdout.strip() or json.dumps({"order": order, "error": result.stderr[-2000:]}), flush=True)


if __name__ == "__main__":
    main()
