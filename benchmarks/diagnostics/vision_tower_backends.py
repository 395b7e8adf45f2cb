"""Same call A/B: the 7B vision tower (random weights, bf16) over 1024 frames with cuDNN attention first vs without."""
import json, statistics, torch
import bench_vamba
from bench_utils import attributes_set, timed
from vamba_hf import layers_vamba, vision_vamba
setup = bench_vamba.seven_b_setup({})
model = bench_vamba.build(setup)
_, pixels, grid = bench_vamba.video_inputs(setup, 1024)
outputs, record = {}, {}
with torch.inference_mode():
    for name, backends in (("cudnn first", layers_vamba.vision_sdpa_backends), ("no cudnn", layers_vamba.sdpa_backends)):
        with attributes_set(vision_vamba, vision_sdpa_backends=backends):
            model.encode_visual(pixels, grid)
            runs = []
            for _ in range(3):
                out, s = timed(lambda: model.encode_visual(pixels, grid), setup.device)
                runs.append(s)
            outputs[name] = out[0].float() if isinstance(out, (tuple, list)) else out.float()
        record[name] = {"median_s": statistics.median(runs), "runs_s": runs}
        print(name, record[name], flush=True)
a, b = outputs["cudnn first"], outputs["no cudnn"]
record["relative_difference"] = ((a - b).norm() / b.norm()).item()
print(json.dumps(record))
