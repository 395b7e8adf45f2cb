"""Vamba on one GPU: prefill / decode time and peak memory against frames, with the Qwen2-VL-7B baseline
(bench_qwen2vl.py, the unchanged anchor, run as a subprocess in the same call). Random weights at 7B sizes, bf16,
640x360 frames (grid h=26, w=46 patches per temporal step: 299 visual tokens per 2 frames). Kernel parity checks
are in check_kernels.py.

    PYTHONPATH=src python benchmarks/bench_vamba.py --out bench_out --frames 16,256,1024,4096 \\
        --baseline-frames 16,256,1024

Sections (--sections, default sweep,baseline,plot):
  sweep     ours over --frames: vision tower, text side, whole prefill (time, peak memory), decode ms/token,
            and what a decoding step reads with the bandwidth that achieves: decode_weight_bytes (the parameters
            of every module one eager decoding step calls: self-attention, the cross-attention query and output
            projections, MLPs, norms, lm_head, one embedding row; not the vision tower, the Mamba-2 blocks or the
            cross-attention K/V projections), decode_cross_kv_bytes (every layer's cross K/V in the cache),
            decode_self_kv_bytes (the self-attention K/V the timed steps read: the decode graph's static buffers
            when it runs), their sum decode_bytes_per_step, and decode_gb_per_s = that sum / decode ms (1 GB =
            1e9 bytes); all from the model's and cache's tensors (element size x count).
            At --checks-frames (1024) also decoding with vs without the CUDA graph, and the float8 cross-K/V cache
            (memory, decode, logits error)
  baseline  benchmarks/bench_qwen2vl.py over --baseline-frames (stops at its first OOM)
  plot      time and memory vs frames for both models (a PNG beside the result file; needs matplotlib)
  tune      cross-attention variants, Mamba-2 segment length and chunk size, vision attention backends,
            vision_max_frames (not part of the default run; each setting is restored after it is measured)
  profile   torch.profiler of the vision tower, the text side and one decode step at --profile-frames (CUDA only;
            not default)
Timings are medians of --repeats runs after one warm-up (Triton autotunes and torch.compile compiles on the first
call); above 1024 frames, one timed run after the warm-up. `--tiny` runs the sections at tiny sizes on CPU. The
table (`.table.md` beside the result file) has a row per model and frame count, with decode GB read per step and
decode GB/s for ours.
"""

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    GIB,
    Budget,
    ResultSink,
    attributes_set,
    frame_counts,
    cross_kv_of,
    output_cache,
    relative,
    start_run,
    synchronize,
    timed,
)

from vamba_hf import VambaConfig, VambaForConditionalGeneration  # noqa: E402
from vamba_hf.cache_vamba import quantize_per_token  # noqa: E402
from vamba_hf.mamba2_vamba import kernels_unavailable_reason  # noqa: E402

HERE = Path(__file__).resolve().parent
# The 7B prompt: Qwen2's special-token ids (im_start, vision_start/end, im_end) around 20 text tokens.
PROMPT_7B = [151644, 8948, 198, 151652, 151653] + list(range(1000, 1020)) + [151645, 198, 151644, 77091, 198]


@dataclass
class Setup:
    """Where and at what sizes the sweep runs."""

    device: torch.device
    dtype: torch.dtype
    config: VambaConfig
    prompt: list
    grid_h: int = 26
    grid_w: int = 46

    @property
    def tokens_per_step(self) -> int:
        return (self.grid_h // 2) * (self.grid_w // 2)


def seven_b_setup(overrides: dict) -> Setup:
    return Setup(torch.device("cuda"), torch.bfloat16, VambaConfig(**overrides), PROMPT_7B)


def tiny_setup(overrides: dict) -> Setup:
    """The demo model's sizes (the package's tiny definition) and a prompt of its tokenizer's special tokens."""
    from vamba_hf.demo import demo_config
    from vamba_hf.tiny import build_tiny_tokenizer, special_token_ids

    tokenizer = build_tiny_tokenizer()
    config = demo_config(tokenizer)
    for key, value in overrides.items():
        setattr(config, key, value)
    ids = special_token_ids(tokenizer)
    prompt = ([ids["im_start_token_id"], 20, 21, ids["vision_start_token_id"], ids["vision_end_token_id"]]
              + list(range(30, 50)) + [ids["eos_token_id"], 21, ids["im_start_token_id"], 22, 21])
    return Setup(torch.device("cpu"), torch.float32, config, prompt, grid_h=4, grid_w=4)


def build(setup: Setup) -> VambaForConditionalGeneration:
    torch.manual_seed(0)
    with setup.device:
        model = VambaForConditionalGeneration._from_config(setup.config, attn_implementation="sdpa",
                                                           dtype=setup.dtype)
    return model.eval()


# -- sweep -----------------------------------------------------------------------------------------------------


def video_inputs(setup: Setup, frames: int):
    steps = frames // 2
    generator = torch.Generator(setup.device).manual_seed(frames)
    pixels = torch.randn(steps * setup.grid_h * setup.grid_w, 3 * 2 * 14 * 14, device=setup.device,
                         dtype=setup.dtype, generator=generator)
    grid = torch.tensor([[steps, setup.grid_h, setup.grid_w]], device=setup.device)
    return torch.tensor([setup.prompt], device=setup.device), pixels, grid


def measure_peak(fn, device):
    """(fn(), seconds, peak GiB of `device` during it; None off CUDA)."""
    if device.type != "cuda":
        out, seconds = timed(fn, device)
        return out, seconds, None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out, seconds = timed(fn, device)
    return out, seconds, torch.cuda.max_memory_allocated() / GIB


def cross_kv_gib(cache) -> float:
    return sum(k.nbytes + v.nbytes for k, v in cross_kv_of(cache).values()) / GIB


def weight_bytes_read(model, step) -> int:
    """Bytes of the parameters that `step()` reads: all parameters of every module it calls (of an embedding, the
    rows it looks up), each tensor once (tied weights are read once)."""
    read = {}

    def note(module, inputs):
        for param in module.parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding):
                nbytes = inputs[0].numel() * param.shape[-1] * param.element_size()
            else:
                nbytes = param.numel() * param.element_size()
            read[id(param)] = max(read.get(id(param), 0), nbytes)

    handles = [module.register_forward_pre_hook(note) for module in model.modules()
               if next(module.parameters(recurse=False), None) is not None]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return sum(read.values())


def cross_kv_bytes(cache) -> int:
    """The cross-attention K/V a decoding step reads for all layers, with their float8 scales if any."""
    store = cache.cross
    return sum(t.nbytes for pair in (*cross_kv_of(cache).values(), *store.scales.values()) for t in pair)


def self_kv_bytes(cache) -> int:
    """The self-attention K/V a decoding step reads: the cache's layers (while a decode graph runs, their static
    buffers: SDPA reads all their positions, masked)."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))


def decode_step_weight_bytes(model, cache, token) -> int:
    """The parameter bytes of one decoding step from `cache`, found by running one eager step (a replayed CUDA
    graph calls no module). The step adds `token` to the cache."""
    with attributes_set(model.config, decode_with_cuda_graph=False):
        return weight_bytes_read(model, lambda: model(input_ids=token, past_key_values=cache, use_cache=True))


def decode_bandwidth(weight_bytes: int, cache, decode_ms: float) -> dict:
    """What each decoding step reads (parameters, cross K/V, self K/V as `cache` holds them after the timed steps)
    and the bandwidth that `decode_ms` per step achieves over it."""
    reads = {"decode_weight_bytes": weight_bytes, "decode_cross_kv_bytes": cross_kv_bytes(cache),
             "decode_self_kv_bytes": self_kv_bytes(cache)}
    total = sum(reads.values())
    return {**reads, "decode_bytes_per_step": total, "decode_gb_per_s": total / decode_ms / 1e6}


def decode(model, cache, token, steps: int, warmup: int = 4, forced=None):
    """Greedy steps from `cache`; returns (ms per token, tokens, per-step logits). `forced` feeds given tokens."""
    device = token.device
    tokens, logits_seen = [], []
    start = None
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        logits_seen.append(logits)
        token = logits.argmax(-1, keepdim=True) if forced is None else forced[i][None, None]
        tokens.append(token[0, 0])
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3, torch.stack(tokens), torch.stack(logits_seen)


def peak_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def sweep_one(model, setup: Setup, frames: int, reps: int, decode_steps: int) -> dict:
    ids, pixels, grid = video_inputs(setup, frames)
    record = {"model": "vamba", "frames": frames, "visual_tokens": frames // 2 * setup.tokens_per_step,
              "repeats": reps}
    device = setup.device
    with torch.inference_mode():
        whole = lambda: model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid,  # noqa: E731
                              use_cache=True, logits_to_keep=1)
        out = whole()  # warm-up
        del out
        vision_s, text_s, whole_s, text_peak, whole_peak = [], [], [], [], []
        cache = None
        for _ in range(reps):
            cache = None  # the previous repetition's cache must not count in this one's peak
            embeds, seconds, _ = measure_peak(lambda: model.encode_visual(pixels, grid), device)
            vision_s.append(seconds)
            out, seconds, peak = measure_peak(lambda: model(input_ids=ids, visual_embeds=embeds, use_cache=True,
                                                            logits_to_keep=1), device)
            text_s.append(seconds)
            text_peak.append(peak)
            del out, embeds
            out, seconds, peak = measure_peak(whole, device)
            whole_s.append(seconds)
            whole_peak.append(peak)
            cache = output_cache(out)
            token = out.logits[:, -1:].argmax(-1)
            del out
        record.update(vision_s=statistics.median(vision_s), text_s=statistics.median(text_s),
                      prefill_s=statistics.median(whole_s), text_peak_gib=peak_of(text_peak),
                      peak_gib=peak_of(whole_peak), cross_kv_gib=cross_kv_gib(cache))
        weight_bytes = decode_step_weight_bytes(model, cache, token)
        record["decode_ms"], _, _ = decode(model, cache, token, decode_steps)
        record.update(decode_bandwidth(weight_bytes, cache, record["decode_ms"]))
    return record


def sweep(model, setup: Setup, frames_list, repeats, decode_steps, sink, budget: Budget) -> list[dict]:
    rows = []
    for frames in frames_list:
        if budget.spent():
            sink.log({"model": "vamba", "frames": frames, "skipped": "budget spent"})
            continue
        reps = repeats if frames <= 1024 else 1  # one timed run after the warm-up: these take 10-40 s each
        try:
            record = sweep_one(model, setup, frames, reps, decode_steps)
        except torch.OutOfMemoryError:
            record = {"model": "vamba", "frames": frames, "oom": True}
        sink.log(record)
        rows.append(record)
        if record.get("oom"):
            break
    return rows


def decode_graph_check(model, setup: Setup, frames: int, decode_steps: int, sink) -> None:
    """Decoding at `frames` with each step replayed from a CUDA graph vs run eagerly: ms/token and the
    teacher-forced logits' difference (off CUDA both runs are eager)."""
    ids, pixels, grid = video_inputs(setup, frames)
    results = {}
    with torch.inference_mode():
        for graph in (False, True):
            with attributes_set(model.config, decode_with_cuda_graph=graph):
                out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True,
                            logits_to_keep=1)
                cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
                forced = results[False]["tokens"] if results else None
                ms, tokens, logits = decode(model, cache, token, decode_steps, warmup=0, forced=forced)
                timed_ms, _, _ = decode(model, cache, tokens[-1:][None], decode_steps)
                results[graph] = dict(ms=timed_ms, tokens=tokens, logits=logits.float())
                del out, cache
    sink.log({"check": "decode graph", "frames": frames, "device": setup.device.type,
              "decode_ms_eager": results[False]["ms"], "decode_ms_graph": results[True]["ms"],
              "graph_vs_eager_logits": relative(results[True]["logits"], results[False]["logits"])})


def float8_round_trip(cache, layers, sink) -> None:
    for layer in layers:
        key, value = cross_kv_of(cache)[layer]
        error = {}
        for name, x in (("key", key), ("value", value)):
            stored, scale = quantize_per_token(x, torch.float8_e4m3fn)
            error[name] = relative(stored.to(x.dtype) * scale, x)
        sink.log({"check": "float8 round trip", "layer": layer, **error,
                  "key_absmax": key.abs().max().item(), "key_rms": key.float().pow(2).mean().sqrt().item(),
                  "value_absmax": value.abs().max().item(), "value_rms": value.float().pow(2).mean().sqrt().item()})


def float8_cache(model, setup: Setup, frames: int, decode_steps: int, sink) -> None:
    """The float8 cross-K/V cache at `frames`: peak memory, decode speed, and the decode logits' error against the
    bf16 cache on the same (teacher-forced) tokens."""
    ids, pixels, grid = video_inputs(setup, frames)
    layers = sorted({0, 1, len(model.model.layers) // 2, len(model.model.layers) - 1})
    results = {}
    with torch.inference_mode():
        for run, storage in (("bf16", None), ("bf16 again", None), ("fp8", "float8_e4m3fn")):
            with attributes_set(model.config, cross_kv_cache_dtype=storage):
                out, seconds, peak = measure_peak(lambda: model(input_ids=ids, pixel_values_videos=pixels,
                                                                video_grid_thw=grid, use_cache=True,
                                                                logits_to_keep=1), setup.device)
                cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
                if run == "bf16":
                    float8_round_trip(cache, layers, sink)
                forced = results["bf16"]["tokens"] if results else None
                ms, tokens, logits = decode(model, cache, token, decode_steps, warmup=0, forced=forced)
                results[run] = dict(prefill_s=seconds, peak_gib=peak, cross_kv_gib=cross_kv_gib(cache),
                                    decode_ms=ms, tokens=tokens, logits=logits.float())
                del out, cache
    bf16, again, fp8 = results["bf16"], results["bf16 again"], results["fp8"]
    sink.log({"check": "float8 cross K/V", "frames": frames, "peak_gib_bf16": bf16["peak_gib"],
              "peak_gib_fp8": fp8["peak_gib"], "cross_kv_gib_bf16": bf16["cross_kv_gib"],
              "cross_kv_gib_fp8": fp8["cross_kv_gib"], "decode_ms_bf16": bf16["decode_ms"],
              "decode_ms_fp8": fp8["decode_ms"], "decode_logits_relative": relative(fp8["logits"], bf16["logits"]),
              "greedy_agreement": (fp8["logits"].argmax(-1) == bf16["logits"].argmax(-1)).float().mean().item(),
              "bf16_rerun_logits_relative": relative(again["logits"], bf16["logits"]),
              "bf16_rerun_greedy_agreement":
                  (again["logits"].argmax(-1) == bf16["logits"].argmax(-1)).float().mean().item()})


# -- tune ------------------------------------------------------------------------------------------------------


def bench_ms(fn, device, repeats: int = 20) -> float:
    """Median milliseconds of fn(): Triton's `do_bench` on CUDA, else wall clock over `repeats` calls."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=repeats * 10, return_mode="median")
    fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats)) * 1e3


def tune_cross_attention(model, setup: Setup, tokens: int, sink) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config, device, dtype = model.config, setup.device, setup.dtype
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = heads // kv_heads
    k = torch.randn(1, tokens, kv_heads, dim, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn_like(k)
    for length in (1, 30):
        q = torch.randn(1, heads, length, dim, device=device, dtype=dtype)
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
                ms = bench_ms(fn, device)
            except RuntimeError as error:  # a forced SDPA backend refuses shapes or devices it does not support
                ms = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            bandwidth = round(2 * k.nbytes / ms / 1e6, 1) if isinstance(ms, float) else None
            sink.log({"tune": "cross-attention", "queries": length, "visual_tokens": tokens, "variant": name,
                      "ms": ms, "kv_read_gb_per_s": bandwidth})


def tune_mamba(model, setup: Setup, tokens: int, sink) -> None:
    block = model.model.layers[0].vision_mixer
    device = setup.device
    visual = torch.randn(1, tokens, model.config.hidden_size, device=device, dtype=setup.dtype)
    with torch.inference_mode():
        for max_tokens in (2**13, 2**14, 2**15, 2**16, 2**40):
            with attributes_set(block.mixer, max_tokens=max_tokens):
                work = visual.clone()
                block(work, in_place=True)
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                times = [timed(lambda: block(work, in_place=True), device)[1] for _ in range(3)]
                activation = (torch.cuda.max_memory_allocated() - base) / GIB if device.type == "cuda" else None
                sink.log({"tune": "mamba segment", "visual_tokens": tokens,
                          "segment_tokens": block.mixer.segment_length(1), "ms": statistics.median(times) * 1e3,
                          "activation_gib": activation})
        for chunk_size in (128, 256):
            # The chunk size lives on the Mamba config that every layer's block shares.
            with attributes_set(block.mixer.config, chunk_size=chunk_size):
                work = visual.clone()
                block(work, in_place=True)
                times = [timed(lambda: block(work, in_place=True), device)[1] for _ in range(3)]
                sink.log({"tune": "mamba chunk_size", "visual_tokens": tokens, "chunk_size": chunk_size,
                          "ms": statistics.median(times) * 1e3})


def tune_vision(model, setup: Setup, frames: int, sink) -> None:
    from vamba_hf import layers_vamba, vision_vamba

    _, pixels, grid = video_inputs(setup, frames)
    device = setup.device
    with torch.inference_mode():
        for name, backends in (("cudnn first", vision_vamba.vision_sdpa_backends),
                               ("no cudnn", layers_vamba.sdpa_backends)):
            with attributes_set(vision_vamba, vision_sdpa_backends=backends):
                model.encode_visual(pixels, grid)
                times = [timed(lambda: model.encode_visual(pixels, grid), device)[1] for _ in range(3)]
            sink.log({"tune": "vision attention backends", "frames": frames, "backends": name,
                      "s": statistics.median(times)})
        for group in (16, 32, 64, 128):
            with attributes_set(model.visual, max_frames=group):
                model.encode_visual(pixels, grid)
                times = [timed(lambda: model.encode_visual(pixels, grid), device)[1] for _ in range(3)]
            sink.log({"tune": "vision_max_frames", "frames": frames, "group": group, "s": statistics.median(times)})


def tune(model, setup: Setup, tiny: bool, sink) -> None:
    tokens = (8 if tiny else 512) * setup.tokens_per_step
    tune_cross_attention(model, setup, tokens, sink)
    tune_mamba(model, setup, tokens, sink)
    tune_vision(model, setup, 8 if tiny else 256, sink)


# -- profile ---------------------------------------------------------------------------------------------------


def write_profile(prof, path: Path, row_limit: int) -> str:
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=70)
    path.write_text(table)
    return table


def profile(model, setup: Setup, frames: int, out_dir: Path, sink) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if setup.device.type != "cuda":
        sink.log({"profile": frames, "skipped": "the profile section reads CUDA kernel times: CUDA only"})
        return
    ids, pixels, grid = video_inputs(setup, frames)
    names = {part: out_dir / f"profile_{part}_{frames}.txt" for part in ("vision", "text", "decode")}
    with torch.inference_mode():
        embeds = model.encode_visual(pixels, grid)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.encode_visual(pixels, grid)
            torch.cuda.synchronize()
        write_profile(prof, names["vision"], 30)
        del pixels
        run = lambda: model(input_ids=ids, visual_embeds=embeds, use_cache=True, logits_to_keep=1)  # noqa: E731
        out = run()
        del out
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = run()
            torch.cuda.synchronize()
        print(write_profile(prof, names["text"], 30), flush=True)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        del out
        decode(model, cache, token, 4, warmup=2)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decode(model, cache, token, 4, warmup=0)
        print(write_profile(prof, names["decode"], 25), flush=True)
    sink.log({"profile": frames, "files": [str(path) for path in names.values()]})


# -- baseline, table, plot -------------------------------------------------------------------------------------


def baseline(frames_list, tiny: bool, sink, budget: Budget) -> list[dict]:
    """The anchor script as a subprocess; killed (and said so) if it is still running when the budget is spent."""
    command = [sys.executable, str(HERE / "bench_qwen2vl.py"), "--tiny" if tiny else ",".join(map(str, frames_list))]
    rows = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(budget.left(), process.kill) if budget.seconds is not None else None
    if watchdog is not None:
        watchdog.start()
    for line in process.stdout:
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            if "frames" in record:
                record["model"] = "qwen2-vl"
                if "prefill_s" in record and "vision_s" in record:
                    record["text_s"] = record["prefill_s"] - record["vision_s"]
                rows.append(record)
            sink.log(record)
    returncode = process.wait()
    if watchdog is not None:
        watchdog.cancel()
    if returncode != 0:
        sink.log({"model": "qwen2-vl", "baseline_exit_code": returncode,
                  "note": "stopped: budget spent" if budget.spent() else "the anchor script failed (see stderr)"})
    return rows


def table(rows: list[dict]) -> str:
    def cell(record, key, fmt, scale=1.0):
        if record.get("oom") and key not in record:
            return "OOM"
        return format(record[key] * scale, fmt) if record.get(key) is not None else "-"

    lines = ["| model | frames | visual tokens | vision tower s | text side s | whole prefill s | peak GiB | "
             "decode ms/token | decode GB read/step | decode GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["frames"])):
        tokens = r.get("visual_tokens", r.get("video_tokens"))
        lines.append(f"| {r['model']} | {r['frames']} | {tokens} | {cell(r, 'vision_s', '.3f')} | "
                     f"{cell(r, 'text_s', '.3f')} | {cell(r, 'prefill_s', '.3f')} | {cell(r, 'peak_gib', '.1f')} | "
                     f"{cell(r, 'decode_ms', '.1f')} | {cell(r, 'decode_bytes_per_step', '.2f', 1e-9)} | "
                     f"{cell(r, 'decode_gb_per_s', '.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plot: matplotlib is not installed; no plot written", flush=True)
        return

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
        ax_time.plot(frames, [r["vision_s"] for r in done], "s--", color=color, alpha=0.6,
                     label=f"{name}: vision tower")
        ax_time.plot(frames, [r["text_s"] for r in done], "^:", color=color, alpha=0.6, label=f"{name}: text side")
        peaks = [(r["frames"], r["peak_gib"]) for r in done if r.get("peak_gib") is not None]
        if peaks:
            ax_mem.plot(*zip(*peaks), "o-", color=color, label=f"{name}: peak, whole prefill")
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
    print(f"plot: {path}", flush=True)


# -- main ------------------------------------------------------------------------------------------------------


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the result file, table and plot")
    parser.add_argument("--sections", default="sweep,baseline,plot")
    parser.add_argument("--frames", default="16,64,256,512,1024,2048,4096")
    parser.add_argument("--baseline-frames", default="16,64,256,512,1024,2048")
    parser.add_argument("--checks-frames", type=int, default=1024,
                        help="frame count of the decode-graph and float8-cache checks (when it is in --frames)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--profile-frames", type=int, default=1024)
    parser.add_argument("--mamba-max-tokens", type=int, default=None)
    parser.add_argument("--vision-max-frames", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new measurements after this many seconds of wall clock")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU, for the test suite (seconds)")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.tiny:
        defaults = {name: parser.get_default(name) for name in ("frames", "baseline_frames", "checks_frames")}
        if args.frames == defaults["frames"]:
            args.frames = "4,8"
        if args.checks_frames == defaults["checks_frames"]:
            args.checks_frames = 8
        args.decode_steps = min(args.decode_steps, 4)
        args.repeats = min(args.repeats, 2)
    args.frames = frame_counts(args.frames)
    args.baseline_frames = frame_counts(args.baseline_frames)
    return args


SECTIONS = ("sweep", "baseline", "plot", "tune", "profile")


def run_model_sections(args, sections, sink, budget: Budget) -> list[dict]:
    overrides = {k: v for k, v in (("mamba_max_tokens", args.mamba_max_tokens),
                                   ("vision_max_frames", args.vision_max_frames)) if v is not None}
    setup = tiny_setup(overrides) if args.tiny else seven_b_setup(overrides)
    model = build(setup)
    sink.log({"model": "vamba", "params": sum(p.numel() for p in model.parameters()), "device": setup.device.type,
              "mamba_backend": model.mamba_backend, **overrides})
    rows = []
    if "tune" in sections:
        tune(model, setup, args.tiny, sink)
    if "sweep" in sections:
        rows += sweep(model, setup, args.frames, args.repeats, args.decode_steps, sink, budget)
        if args.checks_frames in args.frames and not budget.spent():
            for check in (decode_graph_check, float8_cache):
                try:
                    check(model, setup, args.checks_frames, args.decode_steps, sink)
                except torch.OutOfMemoryError:
                    sink.log({"check": check.__name__, "frames": args.checks_frames, "oom": True})
    if "profile" in sections and not budget.spent():
        profile(model, setup, args.profile_frames, args.out, sink)
    return rows


def main() -> None:
    args = parse_args()
    sections = set(args.sections.split(","))
    budget = Budget(args.budget_s)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_vamba: no CUDA device; run with --tiny for the CPU smoke run")
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    sink.log({"kernels": kernels_unavailable_reason(torch.device("cpu" if args.tiny else "cuda"))
              or "mamba-ssm + causal-conv1d"})
    rows = []
    if sections & {"sweep", "tune", "profile"}:
        rows += run_model_sections(args, sections, sink, budget)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "baseline" in sections:
        if budget.spent():
            sink.log({"model": "qwen2-vl", "skipped": "budget spent"})
        else:
            rows += baseline(args.baseline_frames, args.tiny, sink, budget)
    if rows:
        text = table(rows)
        sink.path.with_suffix(".table.md").write_text(text + "\n")
        print(text, flush=True)
    if "plot" in sections and rows:
        plot(rows, sink.path.with_suffix(".png"))
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
