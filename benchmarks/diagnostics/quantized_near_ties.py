"""Where int8 weights and the float8 cross-K/V cache change the golden models' greedy ids (CPU, fp32), and why:
per case and variant the 8 generated ids and, at the first id that differs from fp32's, fp32's margin between its two
best scores against how far the variant moved the scores there.

    PYTHONPATH=src VAMBA_GOLDEN_DIR=../shared/golden python benchmarks/diagnostics/quantized_near_ties.py
(needs torchao; reads the test suite's helpers)."""

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from convert_helpers import golden_generation_inputs  # noqa: E402
from test_quantization import ConvertedCases, load  # noqa: E402


def first_difference(out, reference, prompt_length: int) -> str:
    ids, expected = out.sequences[0, prompt_length:], reference.sequences[0, prompt_length:]
    differing = (ids != expected).nonzero()
    if not len(differing):
        return ""
    step = differing[0].item()
    scores, expected_scores = out.scores[step][0], reference.scores[step][0]
    best, second = expected_scores.topk(2).values
    return (f" | first difference at step {step}: fp32's margin {float(best - second):.2e}, "
            f"largest score change {float((scores - expected_scores).abs().max()):.2e}")


def main() -> None:
    golden = Path(os.environ.get("VAMBA_GOLDEN_DIR", "../shared/golden"))
    folders = ConvertedCases(golden, Path(tempfile.mkdtemp()))
    for case in ("image", "video_short", "video_long"):
        inputs = golden_generation_inputs(golden / case)
        runs = {}
        for weights in (None, "int8"):
            for cache_dtype in (None, "float8_e4m3fn"):
                model = load(folders[case], weights, cross_kv_cache_dtype=cache_dtype)
                with torch.no_grad():
                    runs[weights, cache_dtype] = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                                                eos_token_id=None, return_dict_in_generate=True,
                                                                output_scores=True)
        prompt_length = inputs["input_ids"].shape[1]
        for (weights, cache_dtype), out in runs.items():
            print(f"{case} weights={weights or 'fp32'} cross_kv={cache_dtype or 'fp32'}: "
                  f"{out.sequences[0, prompt_length:].tolist()}"
                  f"{first_difference(out, runs[None, None], prompt_length)}")


if __name__ == "__main__":
    main()
