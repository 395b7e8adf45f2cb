#!/usr/bin/env bash
# Issue 6's GPU checks in one run on a machine with 2 GPUs (nvidia-h200-x2), logs under $OUT (or ./scaleout-logs):
#   1. device_map="auto" over 2 GPUs gives the same greedy tokens as one GPU (examples/multi_gpu_generate.py);
#   2. a few FSDP2 training steps of examples/finetune.py through `accelerate launch` on 2 GPUs, small model;
#   3. one training step at the 7B sizes on 256 frames, Vamba next to Qwen2-VL-7B (benchmarks/bench_train_step.py);
#   4. the CUDA-graph decoding step against the eager one at the 7B sizes, fp32 and bf16.
# STEPS="1 2" runs a subset. NVLink multicast stays off (it can take a shared host's GPUs out of service).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
logs=${OUT:-scaleout-logs}
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$logs/gpus.txt"
want() { [[ " ${STEPS:-1 2 3 4} " == *" $1 "* ]]; }
failed=()
passed() { (($1 == 0)) || failed+=("$2"); }  # exit status of a step's command, step name

if want 1; then
echo "== 1. device_map=auto over 2 GPUs vs one GPU"
python3 examples/multi_gpu_generate.py --tiny --gpus 2 --max-new-tokens 16 2>&1 | tee "$logs/multi_gpu_generate.log"
passed "${PIPESTATUS[0]}" 1
fi

if want 2; then
echo "== 2. FSDP2 fine-tuning steps on 2 GPUs"
data=$(mktemp -d)
python3 - "$data" <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
from vamba_hf.demo import demo_frames

root = Path(sys.argv[1])
with open(root / "train.jsonl", "w") as out:
    for clip in range(8):
        frames = []
        for index, frame in enumerate(demo_frames(num_frames=4 + 2 * (clip % 3), width=112, height=84)):
            name = f"clip{clip}/{index:03d}.png"
            (root / name).parent.mkdir(exist_ok=True)
            Image.fromarray(frame).save(root / name)
            frames.append(name)
        out.write(json.dumps({"video": frames, "question": f"What moves in clip {clip}?",
                              "answer": "A red square moves to the right."}) + "\n")
PY
accelerate launch --config_file examples/accelerate_fsdp.yaml examples/finetune.py --tiny --data "$data/train.jsonl" \
  --video-dir "$data" --output-dir "$data/out" --max-steps 8 --learning-rate 2e-3 --bf16 --gradient-checkpointing \
  2>&1 | tee "$logs/fsdp_finetune.log" | grep -E "'loss'|trained|Error|error"
passed "${PIPESTATUS[0]}" 2
python3 benchmarks/check_finetuned.py --data "$data/train.jsonl" --video-dir "$data" --output-dir "$data/out" 2>&1 |
  tee "$logs/fsdp_saved_model.log" | grep -E "check|Error"
passed "${PIPESTATUS[0]}" "2 (saved model)"
echo "== 2b. the saved folder through from_pretrained under FSDP2 (as a real checkpoint loads), 2 steps at lr 0"
accelerate launch --config_file examples/accelerate_fsdp.yaml examples/finetune.py --model "$data/out" \
  --data "$data/train.jsonl" --video-dir "$data" --output-dir "$data/out_again" --max-steps 2 --learning-rate 0 --bf16 \
  --gradient-checkpointing 2>&1 | tee "$logs/fsdp_from_pretrained.log" | grep -E "'loss'|trained|Error|error"
passed "${PIPESTATUS[0]}" 2b
python3 - "$data/out" "$data/out_again" <<'PY' 2>&1 | tee -a "$logs/fsdp_from_pretrained.log"
import sys
import torch
from safetensors.torch import load_file

before, after = (load_file(f"{folder}/model.safetensors") for folder in sys.argv[1:])
assert before.keys() == after.keys(), sorted(before.keys() ^ after.keys())
# --bf16 loads the weights in bf16 (accelerate then keeps fp32 copies for FSDP's mixed precision): compare with the
# first folder's fp32 weights rounded to bf16 the same way
changed = [name for name in before if not torch.equal(before[name].bfloat16().to(after[name].dtype), after[name])]
dtypes = sorted({str(t.dtype) for t in after.values()})
print(f"check: {len(before)} tensors loaded, sharded, gathered and saved ({dtypes}); {len(changed)} changed at lr 0 "
      f"{changed[:5]}")
sys.exit(1 if changed else 0)
PY
passed "${PIPESTATUS[0]}" "2b (round trip)"
fi

if want 3; then
echo "== 3. one training step at 7B sizes, 256 frames: Vamba and Qwen2-VL-7B"
python3 benchmarks/bench_train_step.py --frames 256 --out "$logs/train_step.jsonl" 2>&1 | tee "$logs/train_step.log" |
  tail -5
passed "${PIPESTATUS[0]}" 3
fi

if want 4; then
echo "== 4. CUDA-graph decoding step vs eager at 7B sizes"
(cd benchmarks && python3 check_decode_graph_7b.py --frames 256) 2>&1 | tee "$logs/decode_graph_7b.log" | grep check
passed "${PIPESTATUS[0]}" 4
fi

if ((${#failed[@]})); then
  echo "failed steps: ${failed[*]} (their logs are in $logs)"
  exit 1
fi
