"""Vamba on one GPU: CUDA-kernel vs PyTorch parity, then prefill / decode time and peak memory against frames, with
the Qwen2-VL-7B baseline (bench_qwen2vl.py, run as a subprocess in the same call). Random weights at 7B sizes, bf16,
640x360 frames (grid h=26, w=46 patches per temporal step: 299 visual tokens per 2 frames).

    PYTHONPATH=src python benchmarks/bench_vamba.py --out bench_out

Sections (--sections, default parity,sweep,baseline,plot):
  parity    kernel path (mamba-ssm + causal-conv1d) vs `Mamba2.use_kernels = False` on the golden fixtures (fp32,
            bf16) and on a 7B-sized random layer (bf16); segmented == unsegmented scan at 2048 and 4096 frames;
            greedy generation with vs without the CUDA-graph decoding step on the golden fixtures
  sweep     ours over --frames: vision tower, text side, whole prefill (time, peak memory), decode ms/token;
            at 1024 frames also decoding with vs without the CUDA graph, and the float8 cross-K/V cache (memory,
            decode, logits error)
  baseline  benchmarks/bench_qwen2vl.py over --baseline-frames (stops at its first OOM)
  plot      time and memory vs frames for both models (bench_vamba.png)
  tune      cross-attention variants, Mamba-2 segment length, vision_max_frames (not part of the default run)
  profile   torch.profiler of the text side and of one decode step at --profile-frames (not default)
Timings are medians of --repeats runs after one warm-up (Triton autotunes and torch.compile compiles on the first
call); above 1024 frames, one timed run after the warm-up.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vamba_hf import VambaConfig, VambaForConditionalGeneration  # noqa: E402
from vamba_hf.cache_vamba import quantize_per_token  # noqa: E402
from vamba_hf.mamba2_vamba import Mamba2, kernels_unavailable_reason  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID_H, GRID_W = 26, 46
TOKENS_PER_STEP = (GRID_H // 2) * (GRID_W // 2)  # 299 visual tokens per temporal step (2 frames)
PROMPT = [151644, 8948, 198, 151652, 151653] + list(range(1000, 1020)) + [151645, 198, 151644, 77091, 198]
GIB = 2**30


def log(record: dict, sink) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    sink.write(line + "\n")
    sink.flush()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def set_kernels(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, Mamba2):
            module.use_kernels = enabled


def build(config: VambaConfig) -> VambaForConditionalGeneration:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


def sync_seconds(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


# -- parity ----------------------------------------------------------------------------------------------------


def golden_parity(root: Path, sink) -> None:
    from safetensors.torch import load_file

    for case in ("video_short", "video_long", "image"):
        folder = root / case
        reference = load_file(folder / "reference_outputs.safetensors")
        for dtype in (torch.float32, torch.bfloat16):
            model = VambaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
            model = model.cuda().eval()
            inputs = {k: v.cuda() for k, v in load_file(folder / "inputs.safetensors").items()}
            for name in ("pixel_values", "pixel_values_videos"):
                if name in inputs:
                    inputs[name] = inputs[name].to(dtype)
            logits = {}
            with torch.inference_mode():
                for kernels in (True, False):
                    set_kernels(model, kernels)
                    logits[kernels] = model(**inputs, use_cache=False).logits
            log({"check": "golden", "case": case, "dtype": str(dtype).split(".")[-1],
                 "kernel_backend": kernels_unavailable_reason(model.device) or "mamba-ssm + causal-conv1d",
                 "kernel_vs_torch_logits": relative(logits[True], logits[False]),
                 "kernel_vs_reference_logits": relative(logits[True].cpu(), reference["logits"])}, sink)
            del model


def golden_decode_graph(root: Path, sink) -> None:
    """Greedy generation with each decoding step replayed from a CUDA graph vs run eagerly (fp32, golden)."""
    from safetensors.torch import load_file

    for case in ("video_short", "video_long", "image"):
        folder = root / case
        reference = load_file(folder / "reference_outputs.safetensors")
        model = VambaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa",
                                                              dtype=torch.float32).cuda().eval()
        inputs = {k: v.cuda() for k, v in load_file(folder / "inputs.safetensors").items()}
        runs = {}
        with torch.inference_mode():
            for graph in (True, False):
                model.config.decode_with_cuda_graph = graph
                runs[graph] = model.generate(**inputs, max_new_tokens=12, do_sample=False, output_scores=True,
                                             return_dict_in_generate=True)
        log({"check": "decode graph (golden, fp32)", "case": case,
             "tokens_equal": bool(torch.equal(runs[True].sequences, runs[False].sequences)),
             "tokens_equal_reference": bool(torch.equal(runs[True].sequences.cpu(), reference["generated_ids"])),
             "graph_vs_eager_scores": relative(torch.stack(runs[True].scores), torch.stack(runs[False].scores))}, sink)
        del model


def small_vocab_config() -> VambaConfig:
    """Two decoder layers at 7B sizes (and a small vocabulary and vision tower: they are not under test)."""
    return VambaConfig(num_hidden_layers=2, vocab_size=2048, vision_start_token_id=1, vision_end_token_id=2,
                       vision_config=dict(depth=1))


def layer_parity(sink, tokens: int = 8192) -> None:
    """Layer 0 runs its Mamba-2 block, layer 1's cross-attention reads it."""
    config = small_vocab_config()
    model = build(config)
    generator = torch.Generator("cuda").manual_seed(1)
    visual = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=generator)
    ids = torch.randint(3, 2048, (1, 32), device="cuda", generator=generator)
    ids[0, 1:3] = torch.tensor([config.vision_start_token_id, config.vision_end_token_id])
    mixer = model.model.layers[0].vision_mixer
    out = {}
    with torch.inference_mode():
        for kernels in (True, False):
            set_kernels(model, kernels)
            out[kernels] = (model(input_ids=ids, visual_embeds=[visual[0]], use_cache=False).logits,
                            mixer(visual.clone()))
        mixer.mixer.max_tokens = 2048
        segmented = mixer.mixer(mixer.norm(visual))
        set_kernels(model, True)
        segmented_kernel = mixer.mixer(mixer.norm(visual))
        mixer.mixer.max_tokens = config.mamba_max_tokens
        whole_kernel = mixer.mixer(mixer.norm(visual))
    log({"check": "7B layer", "dtype": "bfloat16", "visual_tokens": tokens,
         "kernel_vs_torch_logits": relative(out[True][0], out[False][0]),
         "kernel_vs_torch_mamba_block": relative(out[True][1], out[False][1]),
         "torch_segmented_2048_vs_kernel": relative(segmented, whole_kernel),
         "kernel_segmented_2048_vs_unsegmented": relative(segmented_kernel, whole_kernel)}, sink)
    del model


def long_segment_parity(sink) -> None:
    """The Mamba-2 block at 2048 and 4096 frames: segments of 2**15 tokens vs the longest the kernels allow."""
    config = small_vocab_config()
    model = build(config)
    mixer = model.model.layers[0].vision_mixer
    generator = torch.Generator("cuda").manual_seed(2)
    for frames in (2048, 4096):
        tokens = frames // 2 * TOKENS_PER_STEP
        visual = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=generator)
        outs, lengths = {}, []
        with torch.inference_mode():
            for max_tokens in (2**15, 2**40):
                mixer.mixer.max_tokens = max_tokens
                lengths.append(mixer.mixer.segment_length(1))
                outs[max_tokens] = mixer(visual.clone(), in_place=True)
        log({"check": "segments", "frames": frames, "visual_tokens": tokens, "segment_tokens": lengths,
             "relative": relative(outs[2**15], outs[2**40]), "finite": bool(outs[2**15].isfinite().all())}, sink)
        del visual, outs
    del model


# -- sweep -----------------------------------------------------------------------------------------------------


def video_inputs(frames: int):
    steps = frames // 2
    generator = torch.Generator("cuda").manual_seed(frames)
    pixels = torch.randn(steps * GRID_H * GRID_W, 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16,
                         generator=generator)
    grid = torch.tensor([[steps, GRID_H, GRID_W]], device="cuda")
    return torch.tensor([PROMPT], device="cuda"), pixels, grid


def measure_peak(fn):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out, seconds = sync_seconds(fn)
    return out, seconds, torch.cuda.max_memory_allocated() / GIB


def decode(model, cache, token, steps: int, warmup: int = 4, forced=None):
    """Greedy steps from `cache`; returns (ms per token, tokens, per-step logits). `forced` feeds given tokens."""
    tokens, logits_seen = [], []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        logits_seen.append(logits)
        token = logits.argmax(-1, keepdim=True) if forced is None else forced[i][None, None]
        tokens.append(token[0, 0])
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, torch.stack(tokens), torch.stack(logits_seen)


def sweep(model, frames_list, repeats, decode_steps, sink) -> list[dict]:
    rows = []
    for frames in frames_list:
        ids, pixels, grid = video_inputs(frames)
        reps = repeats if frames <= 1024 else 1  # one timed run after the warm-up: these take 10-40 s each
        record = {"model": "vamba", "frames": frames, "visual_tokens": frames // 2 * TOKENS_PER_STEP, "repeats": reps}
        try:
            with torch.inference_mode():
                whole = lambda: model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,  # noqa: E731
                                      use_cache=True, logits_to_keep=1)
                out = whole()  # warm-up
                del out
                vision_s, text_s, whole_s, text_peak, whole_peak = [], [], [], [], []
                cache = None
                for _ in range(reps):
                    cache = None  # the previous repetition's cache must not count in this one's peak
                    embeds, seconds, _ = measure_peak(lambda: model.encode_visual(pixels, grid))
                    vision_s.append(seconds)
                    out, seconds, peak = measure_peak(lambda: model(input_ids=ids, visual_embeds=embeds,
                                                                    use_cache=True, logits_to_keep=1))
                    text_s.append(seconds)
                    text_peak.append(peak)
                    del out, embeds
                    out, seconds, peak = measure_peak(whole)
                    whole_s.append(seconds)
                    whole_peak.append(peak)
                    cache = out.past_key_values
                    token = out.logits[:, -1:].argmax(-1)
                    del out
                record.update(vision_s=statistics.median(vision_s), text_s=statistics.median(text_s),
                              prefill_s=statistics.median(whole_s), text_peak_gib=max(text_peak),
                              peak_gib=max(whole_peak))
                record["cross_kv_gib"] = sum(k.nbytes + v.nbytes for k, v in cache.cross.kv.values()) / GIB
                record["decode_ms"], _, _ = decode(model, cache, token, decode_steps)
                del cache
        except torch.OutOfMemoryError:
            record["oom"] = True
        log(record, sink)
        rows.append(record)
        del ids, pixels, grid
        if record.get("oom"):
            break
    return rows


def decode_graph_check(model, frames: int, decode_steps: int, sink) -> None:
    """Decoding at `frames` with each step replayed from a CUDA graph vs run eagerly: ms/token and the
    teacher-forced logits' difference (bf16)."""
    ids, pixels, grid = video_inputs(frames)
    results = {}
    with torch.inference_mode():
        for graph in (False, True):
            model.config.decode_with_cuda_graph = graph
            out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True,
                        logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            forced = results[False]["tokens"] if results else None
            ms, tokens, logits = decode(model, cache, token, decode_steps, warmup=0, forced=forced)
            timed_ms, _, _ = decode(model, cache, tokens[-1:][None], decode_steps)
            results[graph] = dict(ms=timed_ms, tokens=tokens, logits=logits.float())
            del out, cache
    model.config.decode_with_cuda_graph = True
    log({"check": "decode graph", "frames": frames, "decode_ms_eager": results[False]["ms"],
         "decode_ms_graph": results[True]["ms"],
         "graph_vs_eager_logits": relative(results[True]["logits"], results[False]["logits"])}, sink)


def float8_cache(model, frames: int, decode_steps: int, sink) -> None:
    """The float8 cross-K/V cache at `frames`: peak memory, decode speed, and the decode logits' error against the
    bf16 cache on the same (teacher-forced) tokens."""
    ids, pixels, grid = video_inputs(frames)
    results = {}
    with torch.inference_mode():
        for run, storage in (("bf16", None), ("bf16 again", None), ("fp8", "float8_e4m3fn")):
            model.config.cross_kv_cache_dtype = storage
            out, seconds, peak = measure_peak(lambda: model(input_ids=ids, pixel_values_videos=pixels,
                                                            video_grid_thw=grid, use_cache=True, logits_to_keep=1))
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            cross_gib = sum(k.nbytes + v.nbytes for k, v in cache.cross.kv.values()) / GIB
            if run == "bf16":
                for layer in (0, 1, 14, 27):
                    key, value = cache.cross.kv[layer]
                    error = {}
                    for name, x in (("key", key), ("value", value)):
                        stored, scale = quantize_per_token(x, torch.float8_e4m3fn)
                        error[name] = relative(stored.to(x.dtype) * scale, x)
                    log({"check": "float8 round trip", "layer": layer, **error,
                         "key_absmax": key.abs().max().item(), "key_rms": key.float().pow(2).mean().sqrt().item(),
                         "value_absmax": value.abs().max().item(),
                         "value_rms": value.float().pow(2).mean().sqrt().item()}, sink)
            forced = results["bf16"]["tokens"] if results else None
            ms, tokens, logits = decode(model, cache, token, decode_steps, warmup=0, forced=forced)
            results[run] = dict(prefill_s=seconds, peak_gib=peak, cross_kv_gib=cross_gib, decode_ms=ms,
                                    tokens=tokens, logits=logits.float())
            del out, cache
    model.config.cross_kv_cache_dtype = None
    bf16, again, fp8 = results["bf16"], results["bf16 again"], results["fp8"]
    log({"check": "float8 cross K/V", "frames": frames, "peak_gib_bf16": bf16["peak_gib"],
         "peak_gib_fp8": fp8["peak_gib"], "cross_kv_gib_bf16": bf16["cross_kv_gib"],
         "cross_kv_gib_fp8": fp8["cross_kv_gib"], "decode_ms_bf16": bf16["decode_ms"],
         "decode_ms_fp8": fp8["decode_ms"], "decode_logits_relative": relative(fp8["logits"], bf16["logits"]),
         "greedy_agreement": (fp8["logits"].argmax(-1) == bf16["logits"].argmax(-1)).float().mean().item(),
         "bf16_rerun_logits_relative": relative(again["logits"], bf16["logits"]),
         "bf16_rerun_greedy_agreement": (again["logits"].argmax(-1) == bf16["logits"].argmax(-1)).float().mean().item(),
         }, sink)


# -- tune ------------------------------------------------------------------------------------------------------


def bench_ms(fn, repeats: int = 20) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=repeats * 10, return_mode="median")


def tune(model, sink) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = heads // kv_heads
    tokens = 512 * TOKENS_PER_STEP
    k = torch.randn(1, tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn_like(k)
    for length in (1, 30):
        q = torch.randn(1, heads, length, dim, device="cuda", dtype=torch.bfloat16)
        folded = q.reshape(1, kv_heads, groups * length, dim)
        variants = {
            "folded": lambda: F.scaled_dot_product_attention(folded, k, v),
            "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "repeat_kv": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                                v.repeat_interleave(groups, 1)),
            "matmul": lambda: torch.softmax((folded @ k.transpose(-1, -2)).float() * dim**-0.5, -1).to(v.dtype) @ v,
        }
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def forced(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(folded, k, v)
            variants[f"folded_{backend.name.lower()}"] = forced
        for name, fn in variants.items():
            try:
                ms = bench_ms(fn)
            except Exception as error:  # a backend may refuse the shapes
                ms = f"{type(error).__name__}"
            log({"tune": "cross-attention", "queries": length, "visual_tokens": tokens, "variant": name, "ms": ms,
                 "kv_read_gb_per_s": round(2 * k.nbytes / ms / 1e6, 1) if isinstance(ms, float) else None}, sink)
    del k, v

    mixer = model.model.layers[0].vision_mixer
    visual = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for max_tokens in (2**13, 2**14, 2**15, 2**16, 2**40):
            mixer.mixer.max_tokens = max_tokens
            work = visual.clone()
            mixer(work, in_place=True)
            torch.cuda.synchronize()
            times = []
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for _ in range(3):
                _, seconds = sync_seconds(lambda: mixer(work, in_place=True))
                times.append(seconds)
            log({"tune": "mamba segment", "visual_tokens": tokens, "segment_tokens": mixer.mixer.segment_length(1),
                 "ms": statistics.median(times) * 1e3,
                 "activation_gib": (torch.cuda.max_memory_allocated() - base) / GIB}, sink)
        mixer.mixer.max_tokens = config.mamba_max_tokens
        for chunk_size in (128, 256):
            mixer.mixer.config.chunk_size = chunk_size
            work = visual.clone()
            mixer(work, in_place=True)
            times = [sync_seconds(lambda: mixer(work, in_place=True))[1] for _ in range(3)]
            log({"tune": "mamba chunk_size", "visual_tokens": tokens, "chunk_size": chunk_size,
                 "ms": statistics.median(times) * 1e3}, sink)
        del visual, work

        _, pixels, grid = video_inputs(256)
        import contextlib

        from vamba_hf import vision_vamba

        for name, backends in (("no cudnn", vision_vamba.sdpa_backends), ("torch default", contextlib.nullcontext)):
            original, vision_vamba.sdpa_backends = vision_vamba.sdpa_backends, backends
            try:
                model.encode_visual(pixels, grid)
                times = [sync_seconds(lambda: model.encode_visual(pixels, grid))[1] for _ in range(3)]
            finally:
                vision_vamba.sdpa_backends = original
            log({"tune": "vision attention backends", "frames": 256, "backends": name,
                 "s": statistics.median(times)}, sink)
        for group in (16, 32, 64, 128):
            model.visual.max_frames = group
            model.encode_visual(pixels, grid)
            times = [sync_seconds(lambda: model.encode_visual(pixels, grid))[1] for _ in range(3)]
            log({"tune": "vision_max_frames", "frames": 256, "group": group, "s": statistics.median(times)}, sink)
        model.visual.max_frames = config.vision_max_frames


# -- profile ---------------------------------------------------------------------------------------------------


def profile(model, frames: int, out_dir: Path, sink) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids, pixels, grid = video_inputs(frames)
    with torch.inference_mode():
        embeds = model.encode_visual(pixels, grid)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.encode_visual(pixels, grid)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        (out_dir / f"profile_vision_{frames}.txt").write_text(table)
        del pixels
        run = lambda: model(input_ids=ids, visual_embeds=embeds, use_cache=True, logits_to_keep=1)  # noqa: E731
        out = run()
        del out
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = run()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        (out_dir / f"profile_text_{frames}.txt").write_text(table)
        print(table, flush=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        decode(model, cache, token, 4, warmup=2)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode(model, cache, token, 4, warmup=0)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        (out_dir / f"profile_decode_{frames}.txt").write_text(table)
        print(table, flush=True)
    log({"profile": frames, "files": [f"profile_{part}_{frames}.txt" for part in ("vision", "text", "decode")]}, sink)


# -- baseline, table, plot -------------------------------------------------------------------------------------


def baseline(frames_list, sink) -> list[dict]:
    command = [sys.executable, str(HERE / "bench_qwen2vl.py"), ",".join(map(str, frames_list))]
    rows = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            if "frames" in record:
                record["model"] = "qwen2-vl"
                if "prefill_s" in record and "vision_s" in record:
                    record["text_s"] = record["prefill_s"] - record["vision_s"]
                rows.append(record)
                log(record, sink)
    process.wait()
    return rows


def table(rows: list[dict]) -> str:
    def cell(record, key, fmt):
        if record.get("oom") and key not in record:
            return "OOM"
        return format(record[key], fmt) if key in record else "-"

    lines = ["| model | frames | visual tokens | vision tower s | text side s | whole prefill s | peak GiB | "
             "decode ms/token |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["frames"])):
        tokens = r.get("visual_tokens", r.get("video_tokens"))
        lines.append(f"| {r['model']} | {r['frames']} | {tokens} | {cell(r, 'vision_s', '.3f')} | "
                     f"{cell(r, 'text_s', '.3f')} | {cell(r, 'prefill_s', '.3f')} | {cell(r, 'peak_gib', '.1f')} | "
                     f"{cell(r, 'decode_ms', '.1f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"vamba": "tab:blue", "qwen2-vl": "tab:red"}
    for name, color in styles.items():
        done = sorted((r for r in rows if r["model"] == name and "prefill_s" in r), key=lambda r: r["frames"])
        if not done:
            continue
        frames = [r["frames"] for r in done]
        ax_time.plot(frames, [r["prefill_s"] for r in done], "o-", color=color, label=f"{name}: whole prefill")
        ax_time.plot(frames, [r["vision_s"] for r in done], "s--", color=color, alpha=0.6, label=f"{name}: vision tower")
        ax_time.plot(frames, [r["text_s"] for r in done], "^:", color=color, alpha=0.6, label=f"{name}: text side")
        ax_mem.plot(frames, [r["peak_gib"] for r in done], "o-", color=color, label=f"{name}: peak, whole prefill")
        for r in rows:
            if r["model"] == name and r.get("oom"):
                ax_mem.axvline(r["frames"], color=color, linestyle=":", label=f"{name}: OOM at {r['frames']} frames")
    for ax, label in ((ax_time, "seconds"), (ax_mem, "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("frames (640x360)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ax_time.set_title("Prefill time (bf16, random 7B weights)")
    ax_mem.set_title(f"Peak memory ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- main ------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import transformers
    import triton

    versions = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__, "triton": triton.__version__}
    for name in ("mamba_ssm", "causal_conv1d", "flash_attn"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    versions["kernels"] = kernels_unavailable_reason(torch.device("cuda")) or "mamba-ssm + causal-conv1d"
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    parser.add_argument("--sections", default="parity,sweep,baseline,plot")
    parser.add_argument("--frames", default="16,64,256,512,1024,2048,4096")
    parser.add_argument("--baseline-frames", default="16,64,256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--profile-frames", type=int, default=1024)
    parser.add_argument("--golden", type=Path, default=next(
        (p for p in (Path(".golden"), Path("/work/shared/golden")) if p.exists()), Path(".golden")))
    parser.add_argument("--mamba-max-tokens", type=int, default=None)
    parser.add_argument("--vision-max-frames", type=int, default=None)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    sink = (args.out / "results.jsonl").open("a")
    log({"environment": environment(), "argv": sys.argv}, sink)

    if "parity" in sections:
        golden_parity(args.golden, sink)
        golden_decode_graph(args.golden, sink)
        layer_parity(sink)
        long_segment_parity(sink)
        torch.cuda.empty_cache()

    rows = []
    if sections & {"sweep", "tune", "profile"}:
        overrides = {k: v for k, v in (("mamba_max_tokens", args.mamba_max_tokens),
                                       ("vision_max_frames", args.vision_max_frames)) if v is not None}
        model = build(VambaConfig(**overrides))
        log({"model": "vamba", "params": sum(p.numel() for p in model.parameters()), **overrides}, sink)
        if "tune" in sections:
            tune(model, sink)
        if "sweep" in sections:
            frames = [int(x) for x in args.frames.split(",")]
            rows += sweep(model, frames, args.repeats, args.decode_steps, sink)
            if 1024 in frames:
                decode_graph_check(model, 1024, args.decode_steps, sink)
                float8_cache(model, 1024, args.decode_steps, sink)
        if "profile" in sections:
            profile(model, args.profile_frames, args.out, sink)
        del model
        torch.cuda.empty_cache()

    if "baseline" in sections:
        rows += baseline([int(x) for x in args.baseline_frames.split(",")], sink)
    if rows:
        text = table(rows)
        (args.out / "table.md").write_text(text + "\n")
        print(text, flush=True)
    if "plot" in sections and rows:
        plot(rows, args.out / "bench_vamba.png")


if __name__ == "__main__":
    main()
