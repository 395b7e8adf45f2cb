"""The three Mamba-2 op tables (mamba-ssm + causal-conv1d, our Triton kernels, the PyTorch path) in one run on one GPU:
first token, peak memory, a training step, and our kernels' first-call compile time.

    PYTHONPATH=src python benchmarks/bench_mamba_backends.py --out benchmarks/results

Random weights at 7B sizes, bf16, 640x360 frames (299 visual tokens per 2 frames), the model and inputs of
bench_vamba.py and bench_train_step.py. The table switches per Mamba2 block (`backend_request`); everything else is
the same model. Sections (--sections, default all):
  prefill  first token (the whole prefill: vision tower, every layer, logits of the last position) at --frames,
           each backend in turn: median of --repeats after one warm-up at the first frame count, one run above
           1024 frames; peak GPU memory of the timed calls
  train    one training step at --train-frames (forward + backward with gradient checkpointing + SGD, every
           parameter trained): median of 2 after one warm-up, peak GPU memory
  compile  the first call of one Mamba-2 block (7B sizes, 16,384 tokens) minus its second, in a fresh process with
           an empty Triton cache (cold) and again with that cache (warm); also mamba-ssm's, whose first call also
           autotunes. Without mamba-ssm on the path (only PyTorch's wheel), which table the block picks
`--tiny` runs tiny sizes on CPU (the PyTorch path only; the Triton table too under TRITON_INTERPRET=1).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step  # noqa: E402
from bench_utils import Budget, ResultSink, failure, frame_counts, start_run, timed  # noqa: E402
from bench_vamba import build, measure_peak, seven_b_setup, tiny_setup, video_inputs  # noqa: E402

from vamba_hf.mamba2_vamba import OP_TABLES, Mamba2, backend_unavailable_reason  # noqa: E402

HERE = Path(__file__).resolve().parent


def available_backends(device: torch.device) -> list[str]:
    return [name for name in OP_TABLES if backend_unavailable_reason(name, device) is None]


def use_backend(model, name: str) -> None:
    for module in model.modules():
        if isinstance(module, Mamba2):
            module.backend_request = name


def prefill(model, setup, backends, frames_list, repeats, sink, budget: Budget) -> None:
    warmed = set()
    for frames in frames_list:
        ids, pixels, grid = video_inputs(setup, frames)
        for name in backends:
            if budget.spent():
                sink.log({"section": "prefill", "backend": name, "frames": frames, "skipped": "budget spent"})
                continue
            use_backend(model, name)
            record = {"section": "prefill", "backend": name, "frames": frames,
                      "visual_tokens": frames // 2 * setup.tokens_per_step}
            try:
                with torch.inference_mode():
                    first_token = lambda: model(input_ids=ids, pixel_values_videos=pixels,  # noqa: E731
                                                video_grid_thw=grid, use_cache=True,
                                                logits_to_keep=1).logits[:, -1].argmax(-1)
                    if name not in warmed:
                        first_token()
                        warmed.add(name)
                    runs = [measure_peak(first_token, setup.device)[1:] for _ in range(repeats if frames <= 1024
                                                                                       else 1)]
                record.update(first_token_s=round(statistics.median(s for s, _ in runs), 4),
                              runs_s=[round(s, 4) for s, _ in runs],
                              peak_gib=None if runs[0][1] is None else round(max(p for _, p in runs), 3))
            except Exception as error:
                record.update(failure(error))
            sink.log(record)


def train(backends, frames: int, device, sink, budget: Budget, tiny: bool) -> None:
    sizes = bench_train_step.TINY if tiny else bench_train_step.SEVEN_B
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    model = bench_train_step.vamba_model(sizes, device, dtype).train()
    bench_train_step.enable_checkpointing(model)
    inputs, visual_tokens = bench_train_step.sample("vamba", frames, sizes["grid"], device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name in backends:
        if budget.spent():
            sink.log({"section": "train", "backend": name, "frames": frames, "skipped": "budget spent"})
            continue
        use_backend(model, name)
        record = {"section": "train", "backend": name, "frames": frames, "visual_tokens": visual_tokens}
        try:
            step()  # warm-up
            runs = [measure_peak(step, device)[1:] for _ in range(2)]
            record.update(step_s=round(statistics.median(s for s, _ in runs), 4), runs_s=[round(s, 4) for s, _ in runs],
                          peak_gib=None if runs[0][1] is None else round(max(p for _, p in runs), 3))
        except Exception as error:
            record.update(failure(error))
        sink.log(record)
    del model, optimizer
    gc.collect()


def first_calls(backend: str, tiny: bool) -> dict:
    """In this (fresh) process: one Mamba-2 block's first and second call, and the table it picks by itself."""
    from vamba_hf import VambaConfig
    from vamba_hf.mamba2_vamba import VambaVisionMixer

    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    config = tiny_setup({}).config if tiny else VambaConfig()
    with device:
        block = VambaVisionMixer(config).to(dtype)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    default = block.mixer.backend(device)
    block.mixer.backend_request = backend
    tokens = 64 if tiny else config.mamba_max_tokens
    visual = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
    with torch.inference_mode():
        _, first = timed(lambda: block(visual.clone(), in_place=True), device)
        _, second = timed(lambda: block(visual.clone(), in_place=True), device)
    return {"backend": backend, "first_call_s": round(first, 3), "second_call_s": round(second, 4),
            "compile_s": round(first - second, 3), "default_backend": default}


def compile_times(backends, tiny: bool, sink) -> None:
    """Each backend's first call in fresh processes, cold then warm Triton cache. Our table's runs see only this
    package's source on the path (as a user with PyTorch's wheel alone); mamba-ssm's run keeps the path."""
    own_path = str(Path(__file__).resolve().parents[1] / "src")
    for name in backends:
        if name == "torch":
            continue
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            if name == "triton":
                env["PYTHONPATH"] = own_path
            for cache_state in ("cold", "warm"):
                command = [sys.executable, __file__, "--first-calls", name] + (["--tiny"] if tiny else [])
                result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
                record = {"section": "compile", "cache": cache_state}
                if result.returncode:
                    record.update(backend=name, error=result.stderr.strip().splitlines()[-1:])
                else:
                    record.update(json.loads(result.stdout.strip().splitlines()[-1]))
                sink.log(record)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the result file")
    parser.add_argument("--sections", default="prefill,train,compile")
    parser.add_argument("--frames", default="1024,4096", help="comma-separated frame counts of the prefill section")
    parser.add_argument("--train-frames", type=int, default=256)
    parser.add_argument("--backends", default=None, help="comma-separated op tables (default: every one that runs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds of wall clock")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (seconds)")
    parser.add_argument("--first-calls", metavar="BACKEND", help=argparse.SUPPRESS)  # the compile section's child
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"prefill", "train", "compile"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from prefill, train, compile")
    if args.out is None and not args.first_calls:
        parser.error("--out is required")
    if args.tiny:
        args.frames = "4,8" if args.frames == parser.get_default("frames") else args.frames
        args.train_frames = 8 if args.train_frames == parser.get_default("train_frames") else args.train_frames
    args.frames = frame_counts(args.frames)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.first_calls:
        print(json.dumps(first_calls(args.first_calls, args.tiny)), flush=True)
        return
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_mamba_backends: no CUDA device; run with --tiny for the CPU smoke run")
    device = torch.device("cpu" if args.tiny else "cuda")
    backends = args.backends.split(",") if args.backends else available_backends(device)
    for name in backends:
        if name not in OP_TABLES:
            raise SystemExit(f"--backends: unknown {name!r}; choose from {', '.join(OP_TABLES)}")
        reason = backend_unavailable_reason(name, device)
        if reason:
            raise SystemExit(f"--backends: {name!r} cannot run here ({reason}); drop it or leave --backends out")
    sections = args.sections.split(",")
    budget = Budget(args.budget_s)
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    sink.log({"backends": backends, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    if "compile" in sections:
        compile_times(backends, args.tiny, sink)
    if "train" in sections:
        train(backends, args.train_frames, device, sink, budget, args.tiny)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "prefill" in sections:
        setup = tiny_setup({}) if args.tiny else seven_b_setup({})
        prefill(build(setup), setup, backends, args.frames, args.repeats, sink, budget)
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
