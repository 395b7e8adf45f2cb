"""NVDEC decoding time and device memory with a context of its own per container (torch made the primary one
first) against the shared primary context (decoder first), 256 samples of a 2-minute file, in fresh processes."""
import json, subprocess, sys, time
CHILD = r"""
import json, sys, time, torch
from vamba_hf.video_vamba import VideoSampling, load_video
path, torch_first = sys.argv[1], sys.argv[2] == "torch-first"
free0 = None
if torch_first:
    torch.zeros(1, device="cuda"); torch.cuda.synchronize(); free0 = torch.cuda.mem_get_info()[0]
s = VideoSampling(num_frames=256, decode_workers=4)
runs = []
for _ in range(3):
    t = time.perf_counter(); v = load_video(path, s, decode_device="cuda"); runs.append(time.perf_counter() - t)
free1 = torch.cuda.mem_get_info()[0]
cpu = load_video(path, s)
import numpy as np
same = len(v.frames) == len(cpu.frames) and all(np.array_equal(a, b) for a, b in zip(v.frames, cpu.frames))
print(json.dumps({"order": sys.argv[2], "runs_s": runs, "same_as_cpu": same,
                  "device_free_drop_gib": None if free0 is None else round((free0 - free1) / 2**30, 3)}))
"""
from pathlib import Path
from bench_end_to_end import write_video
path = Path("/tmp/diag-120s.mp4")
write_video(path, 120, 24, 640, 360, 250, "ultrafast")
for order in ("decoder-first", "torch-first"):
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), order], capture_output=True, text=True, timeout=200)
    print(out.stdout.strip() or out.stderr[-2000:], flush=True)
