"""From an hour-long video file to the answer: ours (VambaProcessor + VambaForConditionalGeneration) and Qwen2-VL-7B
the way a transformers user runs it (transformers' `load_video` with PyAV, its Qwen2-VL processor and video
processor, `Qwen2VLForConditionalGeneration`), in one run. Random weights at 7B sizes, bf16, SDPA, on one GPU.

    PYTHONPATH=src python benchmarks/bench_end_to_end.py --out bench_out --work /tmp/e2e --frames 128,512,1024 --stages

The video: `--video-seconds` (3600) of 640x360 H.264 at `--fps`, GOP `--gop`, x264 preset `--preset` (ultrafast),
written once into `--work` and reused. The tokenizer is the package's local one (`vamba_hf.tiny`: a small
vocabulary with the real Qwen2-VL special tokens), shared by both models; nothing is downloaded.

Per frame count and model, one JSON line with:
  decode_s          the frames sampled and decoded from the file (ours: `vamba_hf.load_video`; Qwen2-VL:
                    `transformers.video_utils.load_video(..., backend="pyav")`), peak host RSS during it
  preprocess_s      decoded frames -> model inputs on the GPU through the processor's public call (what
                    `apply_chat_template` runs after loading), patches made on the CPU; on CUDA also with
                    `device="cuda"` (preprocess_on_gpu_s: ours patches the uint8 frames on the GPU, Qwen2-VL's fast
                    video processor resizes and patches them there)
  vision_s          the vision tower on the processed pixels
  text_prefill_s    first token minus vision tower
  first_token_s     pixels -> first logits, cache kept
  answer_s          `generate` of `--new-tokens` tokens (greedy, `min_new_tokens` = `max_new_tokens`);
                    decode_ms_per_token = (answer_s - first_token_s) / (new tokens - 1)
  file_to_first_token_s = decode_s + preprocess_s + first_token_s
  streamed          ours, the file streamed, one entry per `--decode-in` x `--stream-workers` x `--chunk-frames`
                    (`--chunk-frames ""` leaves it out):
                    `processor.video_chunks` (frames decoding in background threads, each chunk patched on the GPU)
                    into `model.encode_video_chunks` (each chunk encoded while the next decode), then the
                    question's prefill from the state: file_to_first_token_s (median of `--cpu-repeats` after a
                    warm-up), peaks, and the first logits against the whole-video prefill's
                    (logits_relative_difference, same_first_token)
  peak_gib          `torch.cuda.max_memory_allocated` over the model stages; rss_*_gib: host RSS peaks
Model-stage timings are medians of `--repeats` runs after a warm-up (ours: at every frame count, as Triton autotunes
and torch.compile compiles for new shapes; Qwen2-VL, which compiles nothing: once); decoding and preprocessing run
`--cpu-repeats` times (CPU only, nothing to warm up; the file is in the page cache after writing).
Then, after the baseline (a short `--budget-s` leaves these out first), ours only (`--extras`, comma-separated):
  beams       greedy, 4 beams and 4 sampled return sequences, `--extras-tokens` tokens on one `--extras-frames`
              video. Each variant is warmed up with exactly its own options and token count (it compiles and
              captures the decode graph for its own batch shapes), then timed `--extras-repeats` times: per
              variant `s` (median), `runs_s` (each timed run), `peak_gib` (peak of the timed runs, counted from a
              reset after the warm-up; None without CUDA), and for beams and return sequences `time_vs_greedy` and
              `peak_vs_greedy` (ratios of the medians and of the peaks; None without peaks)
  batch       a batch of 4 different `--batch-frames`-frame videos vs 4 single calls, one record per answer length
              of `--batch-tokens` (`new_tokens`): both warmed up at that length, then `--extras-repeats` timed runs;
              batch_s / singles_s (medians), speedup, batch_runs_s / singles_runs_s, batch_peak_gib /
              singles_peak_gib, and the greedy ids compared row by row (ids_equal_per_row,
              first_difference_per_row; bf16)
  fp32-batch  the same batch-vs-singles records on a smaller config in fp32, where batched must equal one by one
  fp32-stream on the same smaller config in fp32, the streamed state (the first `--chunk-frames` size) against
              encoding the whole `--extras-frames`-frame video: the question's first logits (relative difference)
              and `--extras-tokens` greedy ids (equal)
"""

import argparse
import gc
import itertools
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    DECODE_IN,
    Budget,
    PeakRss,
    ResultSink,
    add_common_arguments,
    failure,
    frame_counts,
    gpu_peaks_gib,
    median,
    relative,
    reset_gpu_peaks,
    start_run,
    synchronize,
    timed,
)

QUESTION = "Describe the video."
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Our image processor's pixel bounds (Qwen2-VL's image defaults), given to Qwen2-VL's video processor too, so that
# both models see the same grid (640x360 -> 26x46 patches).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
QWEN2_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN2_VL_7B_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)
QWEN2_VL_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
QWEN2_VL_TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)


# -- the video file --------------------------------------------------------------------------------------------


def synthetic_frames(width: int, height: int, count: int) -> list[np.ndarray]:
    """`count` distinct yuv420p frames (a drifting gradient over a fixed texture, a bright square crossing it, a
    slowly changing tint), as PyAV's (height * 3/2, width) planar layout, so that encoding needs no conversion."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 32, (height, width), dtype=np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    side = height // 4
    frames = []
    for index in range(count):
        luma = ((cols + 3 * index) % width * 160 // width + rows * 60 // height).astype(np.uint8) + texture
        left = (width - side) * index // max(count - 1, 1)
        luma[side:2 * side, left:left + side] = 235
        tint = index % 64
        chroma_u = np.full((height // 4, width), 128 + tint, np.uint8)
        chroma_v = np.full((height // 4, width), 128 - tint, np.uint8)
        frames.append(np.concatenate([luma, chroma_u, chroma_v]))
    return frames


def write_video(path: Path, seconds: float, fps: int, width: int, height: int, gop: int, preset: str) -> None:
    """H.264 in MP4 with x264 on all cores. The picture repeats every 10 s (a cycle of distinct frames): the
    encoder's references reach a few frames back, so this costs the encoder and decoder what fresh frames would."""
    import av

    cycle = synthetic_frames(width, height, 10 * fps)
    partial = path.with_name(path.name + ".partial")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps),
                                      options={"preset": preset, "g": str(gop), "threads": "0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(cycle[index % len(cycle)], format="yuv420p")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    partial.rename(path)


def ensure_video(args, sink) -> Path:
    path = args.work / (f"video-{args.width}x{args.height}-{args.video_seconds:g}s-{args.fps}fps-g{args.gop}-"
                        f"{args.preset}.mp4")
    if path.is_file():
        sink.log({"video": str(path), "reused": True, "bytes": path.stat().st_size})
        return path
    args.work.mkdir(parents=True, exist_ok=True)
    _, seconds = timed(lambda: write_video(path, args.video_seconds, args.fps, args.width, args.height, args.gop,
                                           args.preset))
    sink.log({"video": str(path), "reused": False, "write_s": round(seconds, 2), "bytes": path.stat().st_size,
              "seconds": args.video_seconds, "fps": args.fps, "size": [args.width, args.height], "gop": args.gop,
              "preset": args.preset})
    return path


# -- the two models and their processors ------------------------------------------------------------------------


def special_token_ids(tokenizer) -> dict:
    from vamba_hf.tiny import special_token_ids as ids_of

    ids = ids_of(tokenizer)
    ids.pop("im_start_token_id")  # the chat template writes it; not a config field
    return ids


def vamba_config(tokenizer, tiny: bool, **overrides):
    from vamba_hf import VambaConfig

    if tiny:
        from vamba_hf.demo import demo_config

        config = demo_config(tokenizer)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    return VambaConfig(**special_token_ids(tokenizer), **overrides)


def build_vamba(config, device, dtype):
    from vamba_hf import VambaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = VambaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def build_qwen2_vl(tokenizer, tiny: bool, device, dtype):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = special_token_ids(tokenizer)
    text = dict(QWEN2_VL_TINY_TEXT if tiny else QWEN2_VL_7B_TEXT, vocab_size=320 if tiny else 152064,
                bos_token_id=None, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    config = Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_TINY_VISION if tiny else QWEN2_VL_7B_VISION,
                           vision_start_token_id=ids["vision_start_token_id"],
                           vision_end_token_id=ids["vision_end_token_id"], image_token_id=ids["image_token_id"],
                           video_token_id=ids["video_token_id"], eos_token_id=ids["eos_token_id"],
                           pad_token_id=ids["pad_token_id"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def qwen2_vl_processor(tokenizer):
    """transformers' Qwen2-VL processor built in code around the local tokenizer. Raises ImportError where its
    video processor cannot be built (it needs torchvision)."""
    import transformers

    video_processor = transformers.Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image_processor_class = (getattr(transformers, "Qwen2VLImageProcessorPil", None)
                             or transformers.Qwen2VLImageProcessor)
    return transformers.Qwen2VLProcessor(image_processor=image_processor_class(), tokenizer=tokenizer,
                                         video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def conversation(video) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": QUESTION}]}]


class Ours:
    name = "vamba"

    def __init__(self, args, device, dtype):
        from vamba_hf.tiny import build_tiny_processor

        # Frame bounds of the real defaults, except that tiny frames are not enlarged to the 256-pixel shortest edge.
        self.processor = build_tiny_processor(video_longest_edge=args.width,
                                              video_shortest_edge=None if args.tiny else 256)
        self.model = build_vamba(vamba_config(self.processor.tokenizer, args.tiny), device, dtype)
        self.device, self.dtype = device, dtype
        self.decode_workers = args.decode_workers
        self.decode_processes = DECODE_IN[args.decode_in[0]]
        self.decode_device = args.decode_device

    def decode(self, path: Path, frames: int):
        from vamba_hf import load_video

        return load_video(path, self.sampling(frames))

    def sampling(self, frames: int, decode_workers=None, decode_in=None, device_workers=0):
        """`device_workers`: how many of the workers decode on `--decode-device` (0: none, "all": all)."""
        processes = self.decode_processes if decode_in is None else DECODE_IN[decode_in]
        device = {} if device_workers == 0 else dict(decode_device=self.decode_device,
                                                     decode_device_workers=None if device_workers == "all" else
                                                     device_workers)
        return self.processor.video_sampling.with_options(num_frames=frames, max_frames=frames, progress=False,
                                                          decode_workers=decode_workers or self.decode_workers,
                                                          decode_processes=processes, **device)

    def preprocess(self, videos: list, device=None):
        prompt = self.processor.apply_chat_template(conversation("video"), add_generation_prompt=True)
        inputs = self.processor(text=[prompt] * len(videos), videos=videos, return_tensors="pt", device=device)
        return self.to_model(inputs)

    def streamed_state(self, path: Path, frames: int, chunk_frames: int, decode_workers=None, decode_in=None,
                       device_workers=0):
        """File -> video state, each chunk encoded on the device while the next ones decode."""
        sampling = self.sampling(frames, decode_workers, decode_in, device_workers)
        chunks = self.processor.video_chunks(path, chunk_frames=chunk_frames, device=self.device,
                                             **{name: getattr(sampling, name) for name in sampling.option_names()})
        self.chunk_arrivals = []  # perf_counter when each chunk's inputs were ready (its frames decoded)
        return self.model.encode_video_chunks(self.arrivals_recorded(chunks))

    def arrivals_recorded(self, chunks):
        for chunk in chunks:
            self.chunk_arrivals.append(time.perf_counter())
            yield chunk

    def to_model(self, inputs):
        inputs = inputs.to(self.device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        return inputs

    def vision(self, inputs):
        # The vision tower as the model's public method exposes it.
        return self.model.encode_visual(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    def first_token(self, inputs):
        return self.model(**inputs, use_cache=True, logits_to_keep=1)


class Qwen2VL:
    name = "qwen2-vl"

    def __init__(self, args, device, dtype):
        from vamba_hf.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        self.processor = qwen2_vl_processor(tokenizer)
        self.model = build_qwen2_vl(tokenizer, args.tiny, device, dtype)
        self.device, self.dtype = device, dtype

    def decode(self, path: Path, frames: int):
        from transformers.video_utils import load_video

        return load_video(str(path), num_frames=frames, backend="pyav")

    def preprocess(self, videos: list, device=None):
        prompt = self.processor.apply_chat_template(conversation("video"), add_generation_prompt=True)
        arrays = [video for video, _ in videos]
        metadata = [meta for _, meta in videos]
        options = {} if device is None else {"device": str(device)}
        inputs = self.processor(text=[prompt] * len(videos), videos=arrays, video_metadata=metadata,
                                do_sample_frames=False, return_tensors="pt", **options)
        inputs = inputs.to(self.device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        return inputs

    def vision(self, inputs):
        return self.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    def first_token(self, inputs):
        return self.model(**inputs, use_cache=True, logits_to_keep=1)


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- measurements ----------------------------------------------------------------------------------------------


def generate(model, inputs, new_tokens: int, **options):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)


def model_stages(runner, inputs, args, record: dict) -> None:
    """Vision tower, first token and the answer, each `--repeats` times; timings are medians."""
    device = runner.device
    vision, first, answer, peaks = [], [], [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            reset_gpu_peaks()
            features, seconds = timed(lambda: runner.vision(inputs), device)
            vision.append(seconds)
            del features
            out, seconds = timed(lambda: runner.first_token(inputs), device)
            first.append(seconds)
            del out
            sequences, seconds = timed(lambda: generate(runner.model, inputs, args.new_tokens, do_sample=False),
                                       device)
            answer.append(seconds)
            peaks += gpu_peaks_gib()
    record.update(vision_s=median(vision), first_token_s=median(first), answer_s=median(answer),
                  new_tokens=int(sequences.shape[1] - inputs["input_ids"].shape[1]), repeats=args.repeats)
    record["text_prefill_s"] = round(record["first_token_s"] - record["vision_s"], 4)
    record["decode_ms_per_token"] = round((record["answer_s"] - record["first_token_s"]) /
                                          max(record["new_tokens"] - 1, 1) * 1e3, 3)
    if peaks:
        record["peak_gib"] = max(peaks)


def cpu_stages(runner, path: Path, frames: int, args, record: dict):
    decode_s, preprocess_s = [], []
    for _ in range(args.cpu_repeats):
        with PeakRss() as decode_rss:
            video, seconds = timed(lambda: runner.decode(path, frames))
        decode_s.append(seconds)
        with PeakRss() as preprocess_rss:
            inputs, seconds = timed(lambda: runner.preprocess([video]), runner.device)
        preprocess_s.append(seconds)
    record.update(decode_s=median(decode_s), preprocess_s=median(preprocess_s),
                  rss_before_decode_gib=decode_rss.start_gib, rss_decode_peak_gib=decode_rss.peak_gib,
                  rss_preprocess_peak_gib=preprocess_rss.peak_gib,
                  decoded_frames_gib=round(frames * args.width * args.height * 3 / 2**30, 3),
                  video_grid_thw=inputs["video_grid_thw"].tolist(), input_tokens=int(inputs["input_ids"].shape[1]))
    if runner.device.type == "cuda":
        _, seconds = timed(lambda: runner.preprocess([video], device=runner.device), runner.device)  # warm-up
        _, seconds = timed(lambda: runner.preprocess([video], device=runner.device), runner.device)
        record["preprocess_on_gpu_s"] = round(seconds, 4)
    return video, inputs


def streamed_stages(runner: "Ours", path: Path, frames: int, inputs, args, record: dict) -> None:
    """File -> first token with the frames streamed (`processor.video_chunks` -> `model.encode_video_chunks`, then
    the question's prefill from the state), for each of `--chunk-frames`, after one warm-up; medians of
    `--cpu-repeats`. Its first logits against the whole-video prefill's."""
    device = runner.device
    question = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    record["streamed"] = []
    with torch.inference_mode():
        reference = runner.first_token(inputs).logits
    for decode_in, decode_workers, chunk_frames, device_workers in itertools.product(
            args.decode_in, args.stream_workers or [None], args.chunk_frames, args.stream_device_workers):
        def file_to_first_token():
            state = runner.streamed_state(path, frames, chunk_frames, decode_workers, decode_in, device_workers)
            return runner.model(**question, video_state=state, logits_to_keep=1).logits

        seconds_per_run, last_chunk_s, peaks = [], [], []
        with torch.inference_mode():
            file_to_first_token()
            for _ in range(args.cpu_repeats):
                reset_gpu_peaks()
                with PeakRss() as rss:
                    started = time.perf_counter()
                    logits, seconds = timed(file_to_first_token, device)
                seconds_per_run.append(seconds)
                last_chunk_s.append(runner.chunk_arrivals[-1] - started)
                peaks += gpu_peaks_gib()
        difference = relative(logits, reference)
        record["streamed"].append({
            "chunk_frames": chunk_frames, "decode_workers": decode_workers or runner.decode_workers,
            "decode_in": decode_in, "device_workers": device_workers,
            "decode_device": runner.decode_device if device_workers else None,
            "file_to_first_token_s": median(seconds_per_run),
            "last_chunk_ready_s": median(last_chunk_s),  # the last frames decoded; the rest is the GPU's tail
            "rss_peak_gib": rss.peak_gib, "peak_gib": max(peaks, default=None),
            "logits_relative_difference": difference,
            "same_first_token": bool(torch.equal(logits.argmax(-1), reference.argmax(-1)))})


def measure_model(runner, path: Path, counts: list[int], args, sink, budget: Budget) -> dict:
    """Every frame count for one model. For ours, returns {"video": ...}: the first decoded video long enough for
    the extras to sample from, if any."""
    kept = {}
    warmed = False
    for frames in counts:
        if budget.spent():
            sink.log({"model": runner.name, "frames": frames, "skipped": "budget spent"})
            continue
        record = {"model": runner.name, "frames": frames}
        try:
            video, inputs = cpu_stages(runner, path, frames, args, record)
            if not warmed or isinstance(runner, Ours):
                with torch.inference_mode():
                    runner.first_token(inputs)
                    if not warmed:
                        generate(runner.model, inputs, 2, do_sample=False)
                warmed = True
            model_stages(runner, inputs, args, record)
            record["file_to_first_token_s"] = round(record["decode_s"] + record["preprocess_s"] +
                                                    record["first_token_s"], 4)
            if isinstance(runner, Ours) and args.chunk_frames:
                streamed_stages(runner, path, frames, inputs, args, record)
            if isinstance(runner, Ours) and "video" not in kept and frames >= frames_for_extras(args):
                kept["video"] = video
        except Exception as error:
            record.update(failure(error))
        finally:
            inputs = video = None
            free_memory(runner.device)
        sink.log(record)
        if "oom" in record or "error" in record:  # larger counts would fail the same way
            break
    return kept


# -- extras (ours) ---------------------------------------------------------------------------------------------


def frames_for_extras(args) -> int:
    return max(4 * args.batch_frames, args.extras_frames)


def subsampled(video, frames: int, offset: int = 0):
    """`frames` frames of a decoded video, every k-th from `offset` (a different video for each offset < k)."""
    from vamba_hf import VideoFrames

    step = max(len(video.frames) // frames, 1)
    return VideoFrames(frames=video.frames[offset::step][:frames])


def warmed_runs(fn, repeats: int, device):
    """fn() once to warm up (torch.compile, autotuning and the decode graph's capture for its shapes), then
    `repeats` timed runs: (the last run's output, each run's seconds, the GPU peak over the timed runs in GiB; None
    without CUDA). The peak counts from a reset after the warm-up."""
    fn()
    runs, peaks = [], []
    for _ in range(repeats):
        reset_gpu_peaks()
        out, seconds = timed(fn, device)
        runs.append(round(seconds, 4))
        peaks += gpu_peaks_gib()
    return out, runs, max(peaks, default=None)


def ratio(numerator, denominator):
    return None if numerator is None or denominator is None else round(numerator / denominator, 3)


GENERATION_VARIANTS = {"greedy": dict(do_sample=False), "4 beams": dict(do_sample=False, num_beams=4),
                       "4 return sequences (sampled)": dict(do_sample=True, num_return_sequences=4)}


def beams_and_return_sequences(runner, video, args, sink) -> None:
    """Greedy, 4 beams and 4 sampled return sequences of `--extras-tokens` tokens on one `--extras-frames` video,
    each warmed up with its own options, then timed `--extras-repeats` times."""
    inputs = runner.preprocess([subsampled(video, args.extras_frames)])
    record = {"extra": "beams and return sequences", "model": runner.name, "frames": args.extras_frames,
              "new_tokens": args.extras_tokens, "repeats": args.extras_repeats}
    with torch.inference_mode():
        for name, options in GENERATION_VARIANTS.items():
            try:
                _, runs, peak = warmed_runs(lambda: generate(runner.model, inputs, args.extras_tokens, **options),
                                            args.extras_repeats, runner.device)
                record[name] = {"s": median(runs), "runs_s": runs, "peak_gib": peak}
            except torch.OutOfMemoryError:
                record[name] = {"oom": True}
            free_memory(runner.device)
    greedy = record["greedy"]
    for name in ("4 beams", "4 return sequences (sampled)"):
        if "s" in record[name] and "s" in greedy:
            record[name]["time_vs_greedy"] = ratio(record[name]["s"], greedy["s"])
            record[name]["peak_vs_greedy"] = ratio(record[name]["peak_gib"], greedy["peak_gib"])
    sink.log(record)


def new_tokens_per_row(sequences, prompt_length: int) -> list[list[int]]:
    return sequences[:, prompt_length:].tolist()


def batch_vs_singles(runner, video, args, sink, label: str, budget: Budget) -> None:
    """A batch of 4 different `--batch-frames`-frame videos against 4 single calls, at each `--batch-tokens` answer
    length: time, and whether the greedy ids are the same row by row."""
    videos = [subsampled(video, args.batch_frames, offset) for offset in range(4)]
    batched_inputs = runner.preprocess(videos)
    singles_inputs = [runner.preprocess([v]) for v in videos]
    for tokens in args.batch_tokens:
        record = {"extra": "batch vs singles", "label": label, "model": runner.name, "videos": len(videos),
                  "frames": args.batch_frames, "new_tokens": tokens, "dtype": str(runner.dtype)}
        if budget.spent():
            sink.log({**record, "skipped": "budget spent"})
            continue
        try:
            record.update(batch_vs_singles_at(runner, batched_inputs, singles_inputs, tokens, args.extras_repeats))
        except torch.OutOfMemoryError:
            record["oom"] = True
        free_memory(runner.device)
        sink.log(record)


def batch_vs_singles_at(runner, batched_inputs, singles_inputs, tokens: int, repeats: int) -> dict:
    """Batched and single calls answering `tokens` tokens, each warmed up, then timed `repeats` times (medians)."""
    def batch():
        return generate(runner.model, batched_inputs, tokens, do_sample=False)

    def singles():
        return [generate(runner.model, inputs, tokens, do_sample=False) for inputs in singles_inputs]

    with torch.inference_mode():
        batched, batch_runs, batch_peak = warmed_runs(batch, repeats, runner.device)
        single, singles_runs, singles_peak = warmed_runs(singles, repeats, runner.device)
    batch_s, singles_s = median(batch_runs), median(singles_runs)
    batched_ids = new_tokens_per_row(batched, batched_inputs["input_ids"].shape[1])
    single_ids = [new_tokens_per_row(s, inputs["input_ids"].shape[1])[0] for s, inputs in zip(single, singles_inputs)]
    return {"batch_s": batch_s, "singles_s": singles_s, "speedup": round(singles_s / batch_s, 3),
            "batch_runs_s": batch_runs, "singles_runs_s": singles_runs, "repeats": repeats,
            "batch_peak_gib": batch_peak, "singles_peak_gib": singles_peak,
            "ids_equal_per_row": [b == s for b, s in zip(batched_ids, single_ids)],
            "first_difference_per_row": [next((i for i, (x, y) in enumerate(zip(b, s)) if x != y), None)
                                         for b, s in zip(batched_ids, single_ids)]}


class SmallerOurs(Ours):
    """Ours at a smaller config in fp32 (the batched-vs-single equality check, where bf16 rounding alone would
    change ids between two kernel schedules)."""

    def __init__(self, args, device, processor):
        self.processor = processor
        sizes = {} if args.tiny else dict(num_hidden_layers=4, vision_config=dict(depth=4))
        self.model = build_vamba(vamba_config(processor.tokenizer, args.tiny, **sizes), device, torch.float32)
        self.device, self.dtype = device, torch.float32
        self.decode_workers = args.decode_workers
        self.decode_processes = DECODE_IN[args.decode_in[0]]
        self.decode_device = args.decode_device


def extras(ours: Ours, path: Path, kept: dict, args, sink, budget: Budget) -> None:
    """`kept["video"]`, the sweep's decoded video, when it has the frames the extras sample from; else decoded anew."""
    video = kept.get("video")
    if video is None or len(video.frames) < frames_for_extras(args):
        video = ours.decode(path, frames_for_extras(args))
    wanted = args.extras.split(",")
    steps = [("beams", lambda: beams_and_return_sequences(ours, video, args, sink)),
             ("batch", lambda: batch_vs_singles(ours, video, args, sink, "7B bf16" if not args.tiny else "tiny",
                                                budget)),
             ("fp32-batch", lambda: fp32_batch(ours, video, args, sink, budget)),
             ("fp32-stream", lambda: fp32_streamed(ours, path, args, sink))]
    for name, step in steps:
        if name not in wanted:
            continue
        if budget.spent():
            sink.log({"extra": name, "skipped": "budget spent"})
            continue
        try:
            step()
        except Exception as error:
            sink.log({"extra": name, **failure(error)})


def smaller_ours(ours: Ours, args) -> SmallerOurs:
    """The smaller fp32 model, built once after the 7B one is freed (the fp32 extras run last)."""
    if not isinstance(getattr(ours, "small", None), SmallerOurs):
        ours.model = None
        free_memory(ours.device)
        ours.small = SmallerOurs(args, ours.device, ours.processor)
    return ours.small


def fp32_streamed(ours: Ours, path: Path, args, sink) -> None:
    """The streamed state (`--chunk-frames`' first size) against encoding the whole video, in fp32 on the smaller
    config at `--extras-frames` frames: the question's first logits and `--extras-tokens` greedy ids."""
    small = smaller_ours(ours, args)
    inputs = small.preprocess([small.decode(path, args.extras_frames)])
    question = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    greedy = dict(max_new_tokens=args.extras_tokens, min_new_tokens=args.extras_tokens, do_sample=False)
    with torch.inference_mode():
        whole = small.model.encode_video(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        streamed = small.streamed_state(path, args.extras_frames, args.chunk_frames[0])
        logits = [small.model(**question, video_state=state, logits_to_keep=1).logits for state in (whole, streamed)]
        ids = [small.model.generate(**question, video_state=state, **greedy) for state in (whole, streamed)]
    difference = relative(logits[1], logits[0])
    sink.log({"extra": "streamed vs whole video", "label": "smaller config fp32", "frames": args.extras_frames,
              "chunk_frames": args.chunk_frames[0], "new_tokens": args.extras_tokens,
              "logits_relative_difference": difference, "ids_equal": bool(torch.equal(ids[0], ids[1]))})


def fp32_batch(ours: Ours, video, args, sink, budget: Budget) -> None:
    """Runs last: frees the 7B model first."""
    small = smaller_ours(ours, args)
    batch_vs_singles(small, video, args, sink, "smaller config fp32", budget)


# -- main ------------------------------------------------------------------------------------------------------


def stages_plot(sink) -> None:
    """Stacked stage times per model and frame count, from this run's records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--stages: matplotlib is not installed; no plot written", flush=True)
        return
    import json

    rows = [r for r in map(json.loads, sink.path.read_text().splitlines()) if "decode_s" in r and "vision_s" in r]
    if not rows:
        print("--stages: no complete measurement to plot", flush=True)
        return
    stages = ("decode_s", "preprocess_s", "vision_s", "text_prefill_s")
    labels = [f"{r['model']}\n{r['frames']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    bottom = np.zeros(len(rows))
    for stage in stages:
        values = np.array([max(r[stage], 0.0) for r in rows])
        ax.bar(labels, values, bottom=bottom, label=stage.removesuffix("_s").replace("_", " "))
        bottom += values
    ax.set_ylabel("seconds, video file -> first token")
    ax.set_title("Stages from the video file to the first token (random weights)")
    ax.legend()
    fig.tight_layout()
    out = sink.path.with_suffix(".stages.png")
    fig.savefig(out, dpi=120)
    print(f"--stages: {out}", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, frames="128,512,1024,2048")
    parser.add_argument("--work", type=Path, default=None,
                        help="cache folder for the video file (reused if present); default: $VAMBA_HF_CACHE or "
                             "~/.cache/vamba-hf, in bench/")
    parser.add_argument("--video-seconds", type=float, default=3600)
    parser.add_argument("--fps", type=int, default=24, choices=(24, 30))
    parser.add_argument("--gop", type=int, default=250)
    parser.add_argument("--preset", default="ultrafast")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--models", default="vamba,qwen2-vl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-repeats", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-workers", type=int, default=None,
                        help="ours: decoding threads (VideoSampling.decode_workers; default min(4, CPUs))")
    parser.add_argument("--stream-workers", default="",
                        help="ours: decoding threads of the streamed path, comma-separated (default: --decode-workers)")
    parser.add_argument("--decode-in", default="auto",
                        help="ours: seeking decodes in 'threads', 'processes' or 'auto' (VideoSampling."
                             "decode_processes); comma-separated for the streamed path, the first for decode_s")
    parser.add_argument("--decode-device", default="cuda",
                        help="ours: the GPU whose NVDEC the workers of --stream-device-workers decode on")
    parser.add_argument("--stream-device-workers", default="0",
                        help="ours, streamed path: how many decoding workers decode on --decode-device, the others "
                             "on the CPU (VideoSampling.decode_device_workers), comma-separated; 0: none, all: all")
    parser.add_argument("--chunk-frames", default="64",
                        help="ours: frames per chunk of the streamed path, comma-separated ('' leaves it out)")
    parser.add_argument("--extras", default="beams,batch,fp32-batch,fp32-stream", help="comma-separated; '' for none")
    parser.add_argument("--extras-frames", type=int, default=256)
    parser.add_argument("--extras-tokens", type=int, default=16)
    parser.add_argument("--extras-repeats", type=int, default=3,
                        help="timed runs of each extra after its warm-up (medians)")
    parser.add_argument("--batch-frames", type=int, default=128)
    parser.add_argument("--batch-tokens", default="16,128",
                        help="comma-separated answer lengths of the batch-vs-singles extra, one record each")
    parser.add_argument("--stages", action="store_true", help="write a plot of the stage times (matplotlib)")
    args = parser.parse_args()
    if args.tiny:
        args.video_seconds, args.width, args.height = min(args.video_seconds, 4), 112, 84
        args.new_tokens, args.extras_tokens, args.repeats = min(args.new_tokens, 4), min(args.extras_tokens, 3), 1
        args.extras_frames, args.batch_frames = 8, 4
        if args.batch_tokens == parser.get_default("batch_tokens"):
            args.batch_tokens = "2,3"
        if args.frames == parser.get_default("frames"):
            args.frames = "8,16"
    if args.work is None:
        from vamba_hf.demo import default_cache_dir

        args.work = default_cache_dir() / "bench"
    for name in ("repeats", "cpu_repeats", "new_tokens", "extras_frames", "extras_tokens", "extras_repeats",
                 "batch_frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.batch_tokens = positive_counts(parser, args.batch_tokens, "--batch-tokens")
    args.chunk_frames = chunk_sizes(parser, args.chunk_frames)
    args.decode_in = [name.strip() for name in args.decode_in.split(",") if name.strip()]
    if not args.decode_in or set(args.decode_in) - set(DECODE_IN):
        parser.error(f"--decode-in: give comma-separated names of {', '.join(DECODE_IN)}")
    args.stream_workers = positive_counts(parser, args.stream_workers, "--stream-workers") if args.stream_workers \
        else []
    args.stream_device_workers = device_worker_counts(parser, args.stream_device_workers)
    unknown = set(args.models.split(",")) - {"vamba", "qwen2-vl"}
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from vamba, qwen2-vl")
    return args


def device_worker_counts(parser, text: str) -> list:
    counts = [part.strip() for part in text.split(",") if part.strip()]
    if not counts or not all(part == "all" or part.isdigit() for part in counts):
        parser.error(f"--stream-device-workers {text!r}: give comma-separated worker counts or 'all', e.g. 0,4,all")
    return [part if part == "all" else int(part) for part in counts]


def chunk_sizes(parser, text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = [0]
    if any(size < 2 or size % 2 for size in sizes):
        parser.error(f"--chunk-frames {text!r}: give comma-separated even frame counts (the temporal patch is 2), "
                     "e.g. 64,128, or '' to leave the streamed path out")
    return sizes


def positive_counts(parser, text: str, option: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        parser.error(f"{option} {text!r}: give comma-separated counts of at least 1, e.g. 16,128")
    return lengths


def measure_qwen2_vl(path: Path, counts: list[int], args, device, dtype, sink, budget: Budget) -> None:
    if budget.spent():
        sink.log({"model": "qwen2-vl", "skipped": "budget spent"})
        return
    try:
        runner = Qwen2VL(args, device, dtype)
    except ImportError as error:
        reason = " ".join(str(error).split())
        sink.log({"model": "qwen2-vl", "skipped": f"transformers' Qwen2-VL video processor: {reason}"})
        return
    measure_model(runner, path, counts, args, sink, budget)
    del runner
    free_memory(device)


def main() -> None:
    args = parse_args()
    counts = frame_counts(args.frames)
    budget = Budget(args.budget_s)
    sink = ResultSink(args.out, __file__)
    start_run(__file__, args, sink)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("bench_end_to_end: no CUDA device; run with --tiny for the CPU smoke run")
    path = ensure_video(args, sink)
    models = args.models.split(",")
    kept = {}
    if "vamba" in models:
        ours = Ours(args, device, dtype)
        kept = measure_model(ours, path, counts, args, sink, budget)
        del ours
        free_memory(device)
    if "qwen2-vl" in models:
        measure_qwen2_vl(path, counts, args, device, dtype, sink, budget)
    if args.extras and "vamba" in models:
        # After the baseline: when the budget runs short, the extras are what is left out.
        if budget.spent():
            sink.log({"extra": args.extras, "skipped": "budget spent"})
        else:
            extras(Ours(args, device, dtype), path, kept, args, sink, budget)
    synchronize(device)
    if args.stages:
        stages_plot(sink)
    sink.log({"done": True, "wall_s": budget.elapsed()})
    sink.close()


if __name__ == "__main__":
    main()
