"""Every benchmark script's `--tiny` mode on CPU: it runs, writes one JSON line per measurement into a result file
named `<script>-<YYYYMMDD>-<commit>.jsonl`, stops cleanly on `--budget-s`, and its tuning code leaves the model as
it found it."""

import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GOLDEN_CASES, GOLDEN_DIR

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = ("bench_end_to_end.py", "bench_multi_gpu.py", "bench_vamba.py", "bench_video_state.py", "check_kernels.py")


def run_script(script: str, out: Path, *args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--out", str(out), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == expect_rc, result.stderr[-3000:]
    return result


def records(out: Path, script: str) -> list[dict]:
    files = sorted(out.glob("*.jsonl"))
    assert len(files) == 1, files
    stem = Path(script).stem
    match = re.fullmatch(rf"{stem}-(\d{{8}})-([0-9a-f]{{4,40}}|nogit)\.jsonl", files[0].name)
    assert match, files[0].name
    assert match.group(1) == f"{datetime.date.today():%Y%m%d}"
    lines = files[0].read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert "environment" in parsed[0] and parsed[-1].get("done") is True
    return parsed


def test_no_workplace_paths_in_the_scripts():
    for path in list(BENCHMARKS.glob("*.py")) + [BENCHMARKS / "README.md"]:
        assert "/work/" not in path.read_text(), f"{path.name} names a path of this workplace"


def test_end_to_end_tiny(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    run_script("bench_end_to_end.py", out, "--tiny", "--work", str(work), "--frames", "8", "--stages",
               "--extras-repeats", "2", "--batch-tokens", "2,3", "--chunk-frames", "4,8", "--stream-workers", "1,2",
               "--decode-in", "threads,processes")
    rows = records(out, "bench_end_to_end.py")
    video = next(r for r in rows if "video" in r)
    assert video["reused"] is False and Path(video["video"]).is_file()
    ours = next(r for r in rows if r.get("model") == "vamba" and "frames" in r)
    for key in ("decode_s", "preprocess_s", "vision_s", "text_prefill_s", "first_token_s", "answer_s",
                "decode_ms_per_token", "rss_decode_peak_gib", "rss_preprocess_peak_gib"):
        assert math.isfinite(ours[key]), key
    assert ours["frames"] == 8 and ours["video_grid_thw"][0][0] == 4 and ours["new_tokens"] == 4
    assert ours["file_to_first_token_s"] == pytest.approx(ours["decode_s"] + ours["preprocess_s"] +
                                                          ours["first_token_s"], abs=1e-3)
    # Streamed in chunks of 4 frames (two) and of 8 (one): the same first token, logits equal up to the Mamba-2
    # chunk rounding (fp32).
    assert [(entry["decode_in"], entry["decode_workers"], entry["chunk_frames"]) for entry in ours["streamed"]] == [
        (mode, workers, chunk) for mode in ("threads", "processes") for workers in (1, 2) for chunk in (4, 8)]
    for entry in ours["streamed"]:
        assert math.isfinite(entry["file_to_first_token_s"]) and entry["same_first_token"] is True
        assert entry["logits_relative_difference"] < 1e-5
    beams = next(r for r in rows if r.get("extra") == "beams and return sequences")
    variants = ("greedy", "4 beams", "4 return sequences (sampled)")
    for name in variants:  # medians of the timed runs after each variant's own warm-up
        runs = beams[name]["runs_s"]
        assert len(runs) == 2 and all(math.isfinite(t) and t > 0 for t in runs), name
        assert beams[name]["s"] == pytest.approx(sorted(runs)[1] / 2 + sorted(runs)[0] / 2, abs=1e-4), name
        assert beams[name]["peak_gib"] is None  # CPU: no GPU peak
    for name in variants[1:]:
        assert beams[name]["time_vs_greedy"] == pytest.approx(beams[name]["s"] / beams["greedy"]["s"], rel=0.01)
        assert "peak_vs_greedy" in beams[name] and beams[name]["peak_vs_greedy"] is None
    batches = [r for r in rows if r.get("extra") == "batch vs singles"]
    assert [(r["label"], r["new_tokens"]) for r in batches] == [
        (label, tokens) for label in ("tiny", "smaller config fp32") for tokens in (2, 3)]
    for batch in batches:  # fp32 on CPU: a batch must give each row the ids it gets alone
        assert batch["videos"] == 4 and batch["ids_equal_per_row"] == [True] * 4
        assert batch["first_difference_per_row"] == [None] * 4
        assert len(batch["batch_runs_s"]) == len(batch["singles_runs_s"]) == batch["repeats"] == 2
        assert batch["batch_s"] == pytest.approx(sum(batch["batch_runs_s"]) / 2, abs=1e-4)
        assert batch["singles_s"] == pytest.approx(sum(batch["singles_runs_s"]) / 2, abs=1e-4)
        assert batch["speedup"] == pytest.approx(batch["singles_s"] / batch["batch_s"], rel=0.01)
    streamed = next(r for r in rows if r.get("extra") == "streamed vs whole video")
    assert streamed["ids_equal"] is True and streamed["logits_relative_difference"] < 1e-5
    qwen = [r for r in rows if r.get("model") == "qwen2-vl"]
    assert qwen, "no Qwen2-VL line"
    if "skipped" in qwen[0]:
        assert "torchvision" in qwen[0]["skipped"].lower()
    else:
        assert qwen[0]["video_grid_thw"] == ours["video_grid_thw"]
        assert math.isfinite(qwen[0]["first_token_s"])

    # A second run reuses the file; with no budget it measures nothing and still ends cleanly.
    again = tmp_path / "again"
    run_script("bench_end_to_end.py", again, "--tiny", "--work", str(work), "--frames", "8", "--budget-s", "0")
    rows = records(again, "bench_end_to_end.py")
    assert next(r for r in rows if "video" in r)["reused"] is True
    assert not [r for r in rows if "decode_s" in r or "extra" in r and "skipped" not in r]
    assert {"vamba", "qwen2-vl"} <= {r["model"] for r in rows if r.get("skipped") == "budget spent" and "model" in r}


@pytest.mark.parametrize("option, value", [("--batch-tokens", "16,x"), ("--batch-tokens", "0"),
                                           ("--extras-repeats", "0"), ("--chunk-frames", "3"),
                                           ("--chunk-frames", "64,x"), ("--stream-workers", "0")])
def test_end_to_end_rejects_bad_extras_options(tmp_path, option, value):
    result = run_script("bench_end_to_end.py", tmp_path / "out", "--tiny", "--work", str(tmp_path / "work"),
                        option, value, expect_rc=2)
    assert option in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_bench_vamba_tiny(tmp_path):
    run_script("bench_vamba.py", tmp_path, "--tiny", "--frames", "4", "--checks-frames", "4",
               "--sections", "sweep,baseline")
    rows = records(tmp_path, "bench_vamba.py")
    sweep = [r for r in rows if r.get("model") == "vamba" and "prefill_s" in r]
    assert [r["frames"] for r in sweep] == [4] and sweep[0]["decode_ms"] > 0 and sweep[0]["cross_kv_gib"] > 0
    reads = {key: sweep[0][key] for key in ("decode_weight_bytes", "decode_cross_kv_bytes", "decode_self_kv_bytes")}
    assert all(isinstance(value, int) and value > 0 for value in reads.values()), reads
    assert reads["decode_cross_kv_bytes"] == round(sweep[0]["cross_kv_gib"] * 2**30)  # bf16/fp32: no scales
    assert sweep[0]["decode_bytes_per_step"] == sum(reads.values())
    assert sweep[0]["decode_gb_per_s"] > 0
    assert sweep[0]["decode_gb_per_s"] == pytest.approx(sweep[0]["decode_bytes_per_step"] / sweep[0]["decode_ms"]
                                                        / 1e6)
    graph = next(r for r in rows if r.get("check") == "decode graph")
    assert graph["graph_vs_eager_logits"] == 0.0  # on CPU both runs are eager
    assert next(r for r in rows if r.get("check") == "float8 cross K/V")["greedy_agreement"] >= 0
    assert [r["frames"] for r in rows if r.get("model") == "qwen2-vl" and "prefill_s" in r] == [4, 8]
    header, _, *lines = next(tmp_path.glob("*.table.md")).read_text().splitlines()
    assert header.split("|")[-3:-1] == [" decode GB read/step ", " decode GB/s "]
    ours_line = next(line for line in lines if line.startswith("| vamba |"))
    assert ours_line.split("|")[-3].strip() == f"{sweep[0]['decode_bytes_per_step'] / 1e9:.2f}"


def import_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_decode_step_reads_the_text_weights_it_runs():
    """The parameters one decoding step reads: every text-side parameter but the Mamba-2 blocks and the
    cross-attention K/V projections (the cache holds their output), one embedding row per token, the lm_head; no
    vision tower. The cache then holds one more token."""
    bench_vamba = import_benchmark("bench_vamba")
    setup = bench_vamba.tiny_setup({})
    model = bench_vamba.build(setup)
    ids, pixels, grid = bench_vamba.video_inputs(setup, 4)
    with torch.inference_mode():
        out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True)
        cache = bench_vamba.output_cache(out)
        length = cache.get_seq_length()
        measured = bench_vamba.decode_step_weight_bytes(model, cache, out.logits[:, -1:].argmax(-1))
    assert cache.get_seq_length() == length + 1
    not_read = ("vision_mixer.", "cross_attn.k_proj.", "cross_attn.v_proj.")
    layers = sum(p.nbytes for layer in model.model.layers for name, p in layer.named_parameters()
                 if not name.startswith(not_read))
    embedding = model.model.embed_tokens.weight
    expected = (layers + model.model.norm.weight.nbytes + model.lm_head.weight.nbytes
                + embedding.shape[1] * embedding.element_size())
    assert measured == expected


def test_tuning_restores_what_it_changes(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_utils
        import bench_vamba
    finally:
        sys.path.remove(str(BENCHMARKS))
    from vamba_hf import mamba2_vamba, vision_vamba

    setup = bench_vamba.tiny_setup({})
    model = bench_vamba.build(setup)

    def settings():
        mixers = [m for m in model.modules() if isinstance(m, mamba2_vamba.Mamba2)]
        return {"config": model.config.to_dict(), "max_tokens": [m.max_tokens for m in mixers],
                "chunk_size": [m.config.chunk_size for m in mixers], "use_kernels": [m.use_kernels for m in mixers],
                "vision_max_frames": model.visual.max_frames, "sdpa_backends": vision_vamba.vision_sdpa_backends}

    before = settings()
    sink = bench_utils.ResultSink(tmp_path, "bench_vamba.py")
    bench_vamba.tune(model, setup, True, sink)
    bench_vamba.decode_graph_check(model, setup, 4, 2, sink)
    bench_vamba.float8_cache(model, setup, 4, 2, sink)
    sink.close()
    assert settings() == before
    tuned = [json.loads(line) for line in sink.path.read_text().splitlines()]
    assert {r["tune"] for r in tuned if "tune" in r} == {"cross-attention", "mamba segment", "mamba chunk_size",
                                                         "vision attention backends", "vision_max_frames"}


def test_check_kernels_tiny(tmp_path):
    golden = (GOLDEN_DIR / GOLDEN_CASES[0] / "config.json").is_file()
    run_script("check_kernels.py", tmp_path, "--tiny", *(["--golden", str(GOLDEN_DIR)] if golden else []))
    rows = records(tmp_path, "check_kernels.py")
    if golden:
        checked = {(r["case"], r["dtype"]) for r in rows if r.get("check") == "golden"}
        assert checked == {(case, dtype) for case in GOLDEN_CASES for dtype in ("float32", "bfloat16")}
        # On CPU both sides run the PyTorch path: the toggle must change nothing else.
        assert all(r["kernel_vs_torch_logits"] == 0.0 for r in rows if r.get("check") == "golden")
    else:
        assert {r["check"] for r in rows if r.get("skipped") == "no --golden DIR given"} == {"golden", "decode-graph"}
    layer = next(r for r in rows if r.get("check") == "tiny layer")
    assert layer["kernel_vs_torch_logits"] == 0.0
    segments = [r for r in rows if r.get("check") == "segments"]
    assert [r["frames"] for r in segments] == [4, 8]
    for record in segments:
        assert record["segment_tokens"][0] < record["visual_tokens"] <= record["segment_tokens"][1]
        assert record["finite"] and record["relative"] <= 1e-6


def test_check_kernels_rejects_a_folder_without_fixtures(tmp_path):
    result = run_script("check_kernels.py", tmp_path / "out", "--tiny", "--golden", str(tmp_path), expect_rc=2)
    assert "--golden" in result.stderr and "config.json" in result.stderr


def test_multi_gpu_tiny(tmp_path):
    run_script("bench_multi_gpu.py", tmp_path, "--tiny", "--frames", "8")
    rows = records(tmp_path, "bench_multi_gpu.py")
    maps = [r for r in rows if "device_map_layers" in r]
    assert {(r["config"], r["placement"]) for r in maps} == {
        (config, placement) for config in ("tiny", "4 layers") for placement in ("balanced", "max-memory")}
    comparisons = [r for r in rows if "tokens_equal_single_gpu" in r]
    assert len(comparisons) == 4 and all(r["tokens_equal_single_gpu"] for r in comparisons)
    runs = [r for r in rows if "first_token_s" in r]
    assert len(runs) == 6 and all(r["cross_kv_on_layer_device"] and r["new_tokens"] == 4 for r in runs)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs asked for")
def test_multi_gpu_without_the_gpus_says_so_in_one_line(tmp_path):
    result = run_script("bench_multi_gpu.py", tmp_path, "--gpus", "2", expect_rc=2)
    assert len(result.stderr.strip().splitlines()) == 1 and "--gpus 2" in result.stderr
    assert not list(tmp_path.glob("*.jsonl"))


def test_a_failed_measurement_is_reported_not_raised(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_utils
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert bench_utils.failure(torch.OutOfMemoryError("CUDA out of memory")) == {"oom": True}
    try:
        raise ValueError("bad shape\nsecond line")
    except ValueError as error:
        assert bench_utils.failure(error) == {"error": "ValueError: bad shape"}
    assert "Traceback" in capsys.readouterr().err


def test_video_state_tiny(tmp_path):
    run_script("bench_video_state.py", tmp_path, "--tiny")
    rows = records(tmp_path, "bench_video_state.py")
    questions = [r for r in rows if r.get("measure") == "question"]
    extends = [r for r in rows if r.get("measure") == "extend"]
    assert [r["frames"] for r in questions] == [8, 16]
    assert {(r["history_frames"], r["extend_frames"]) for r in extends} == {(8, 2), (8, 4), (16, 2), (16, 4)}
    for row in questions:
        for key in ("full_prefill_s", "encode_s", "second_question_first_token_ms", "save_s", "load_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["logits_relative_diff"] < 1e-5  # the state answers as the pixels do
        assert row["state_bytes"] > 0 and row["file_bytes"] >= row["state_bytes"]
    for row in extends:
        assert math.isfinite(row["extend_ms"]) and row["extend_ms"] > 0 and "error" not in row
    # The state of 16 frames extended by 4 frames 4 times (warm-up included) holds 32 frames' tokens.
    grown = next(r for r in extends if (r["history_frames"], r["extend_frames"]) == (16, 4))
    first = next(r for r in questions if r["frames"] == 16)
    assert grown["state_bytes"] > first["state_bytes"]


def test_bench_preprocess_tiny(tmp_path):
    run_script("bench_preprocess.py", tmp_path, "--tiny", "--frames", "8")
    rows = records(tmp_path, "bench_preprocess.py")
    record = next(r for r in rows if r.get("frames") == 8)
    assert "error" not in record, record
    names = ("default", "pil", "torch")
    assert all(record[f"ours_{name}_s"] > 0 for name in names) and record["video_grid_thw"] == [[4, 4, 8]]
    assert all(math.isfinite(record[f"ours_{name}_rss_growth_gib"]) for name in names)
    assert record["ours_pixels_equal"] is True and record["default_frame_resize"] == "pil"  # on the CPU
    assert ("qwen2_vl_s" in record) != ("qwen2_vl_skipped" in record)
