"""After `examples/finetune.py --tiny` (gpu_scaleout.sh step 2): the saved output folder loads with `from_pretrained`
(no missing or unexpected weights) and its loss on the training data is below the starting model's.

    python benchmarks/check_finetuned.py --data train.jsonl --video-dir DIR --output-dir OUT
"""

import argparse
import importlib.util
from pathlib import Path

import torch

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.processing_vamba import VambaProcessor

REPO = Path(__file__).resolve().parents[1]


def load_finetune_example():
    spec = importlib.util.spec_from_file_location("finetune_example", REPO / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def mean_loss(model, batches) -> float:
    model.eval()
    return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--video-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args()

    finetune = load_finetune_example()
    start, _ = finetune.tiny_model_and_processor()
    trained, info = VambaForConditionalGeneration.from_pretrained(args.output_dir, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    assert not problems, f"the saved model does not load cleanly: {problems}"
    processor = VambaProcessor.from_pretrained(args.output_dir)
    collate = finetune.VideoQACollator(processor, processor.num_frames)
    examples = finetune.read_examples(args.data, args.video_dir)
    batches = [collate([example]) for example in examples]
    before, after = mean_loss(start, batches), mean_loss(trained, batches)
    print(f"check: saved model loads cleanly; loss on the training data {before:.3f} at the start, {after:.3f} saved")
    assert after < before, "the saved model is no better than the starting one"


if __name__ == "__main__":
    main()
