"""The 7B vision tower (random weights) over 256 frames: bf16 with cuDNN attention first and without, each against
the same tower in fp32 (no TF32)."""
import json, torch
import bench_vamba
from bench_utils import attributes_set
from vamba_hf import layers_vamba, vision_vamba
torch.backends.cuda.matmul.allow_tf32 = False
setup = bench_vamba.seven_b_setup({})
model = bench_vamba.build(setup)
_, pixels, grid = bench_vamba.video_inputs(setup, 256)
outs = {}
with torch.inference_mode():
    for name, backends in (("cudnn first", layers_vamba.vision_sdpa_backends), ("no cudnn", layers_vamba.sdpa_backends)):
        with attributes_set(vision_vamba, vision_sdpa_backends=backends):
            outs[name] = model.encode_visual(pixels, grid)[0].float()
    model.visual.float()
    reference = model.visual(pixels.float(), grid)[0].float()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
print(json.dumps({"frames": 256, "cudnn_vs_fp32": rel(outs["cudnn first"], reference),
                  "flash_vs_fp32": rel(outs["no cudnn"], reference), "cudnn_vs_flash": rel(outs["cudnn first"], outs["no cudnn"])}))
