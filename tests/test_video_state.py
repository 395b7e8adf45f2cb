"""A video encoded once (`VideoState`): answers from it equal answers from the pixels, extending it equals encoding
the longer video, one state serves many questions without copying its K/V, beams encode each video once, and a
saved state loads back into the model that made it only."""

import functools
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import GOLDEN_DIR
from helpers import golden_inputs, left_pad, load_golden, prompt, tiny_model, video_pixels
from vamba_hf.modeling_vamba import CACHE_NAME, VambaForConditionalGeneration
from vamba_hf.video_state_vamba import VideoState, load_video_state

REPO = Path(__file__).resolve().parents[1]
GREEDY = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True, min_new_tokens=8)
ROPE_AND_NORM = dict(cross_attn_use_position_embeddings=True, cross_attn_use_layer_norm=True)


def needs_golden():
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden fixtures missing at {GOLDEN_DIR}")


def assert_same_generation(ours, reference, rtol=1e-6, atol=1e-6):
    assert torch.equal(ours.sequences, reference.sequences)
    assert len(ours.scores) == len(reference.scores)
    for step, (a, b) in enumerate(zip(ours.scores, reference.scores)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"scores of step {step}")


def encode(model, visual: dict) -> VideoState:
    if "pixel_values_videos" in visual:
        return model.encode_video(visual["pixel_values_videos"], visual["video_grid_thw"])
    return model.encode_image(visual["pixel_values"], visual["image_grid_thw"])


def tiny64(**overrides):
    return tiny_model(**overrides).double()


def tiny_video(t, h=4, w=4, seed=0):
    pixels, grid = video_pixels(t, h, w, seed)
    return pixels.double(), grid


# -- answering from a state ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["video_short", "video_long", "image"])
def test_generate_from_a_state_equals_generate_from_pixels_on_the_golden_models(case):
    needs_golden()
    model, _ = load_golden(GOLDEN_DIR / case, "sdpa")
    input_ids, attention_mask, visual = golden_inputs(GOLDEN_DIR / case)
    from_pixels = model.generate(input_ids=input_ids, attention_mask=attention_mask, **visual, **GREEDY)
    state = encode(model, visual)
    from_state = model.generate(input_ids=input_ids, attention_mask=attention_mask, video_state=state, **GREEDY)
    assert_same_generation(from_state, from_pixels)


@pytest.mark.parametrize("overrides", [{}, ROPE_AND_NORM, dict(ROPE_AND_NORM, use_alpha_balancing=False)])
def test_generate_from_a_state_equals_generate_from_pixels_tiny_float64(overrides):
    model = tiny64(**overrides)
    pixels, grid = tiny_video(6)
    ids = prompt(5, 4)[None]
    from_pixels = model.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, **GREEDY)
    from_state = model.generate(input_ids=ids, video_state=model.encode_video(pixels, grid), **GREEDY)
    assert_same_generation(from_state, from_pixels, rtol=1e-12, atol=1e-12)


def test_a_state_touches_neither_the_vision_tower_nor_mamba():
    model = tiny64()
    state = model.encode_video(*tiny_video(4))
    calls = []
    hooks = [model.visual.register_forward_hook(lambda *_: calls.append("vision"))]
    hooks += [layer.vision_mixer.register_forward_hook(lambda *_: calls.append("mamba"))
              for layer in model.model.layers if hasattr(layer, "vision_mixer")]
    for name, module in model.named_modules():
        if name.endswith("vision_mixer.mixer"):
            hooks.append(module.register_forward_pre_hook(lambda *_: calls.append("mamba")))
    model.generate(input_ids=prompt(3, 3)[None], video_state=state, max_new_tokens=3, do_sample=False)
    for hook in hooks:
        hook.remove()
    assert calls == []


def test_float8_states_keep_the_caches_storage():
    model = tiny_model(cross_kv_cache_dtype="float8_e4m3fn")
    pixels, grid = video_pixels(4, 4, 4)
    ids = prompt(4, 2)[None]
    state = model.encode_video(pixels, grid)
    out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True)
    cross = getattr(out, CACHE_NAME).cross
    kv, scales = state.cross_kv()
    for layer in range(model.config.num_hidden_layers):
        assert kv[layer][0].dtype == torch.float8_e4m3fn
        for ours, cached in zip((*kv[layer], *scales[layer]), (*cross.kv[layer], *cross.scales[layer])):
            assert torch.equal(ours.float(), cached.float())
    # Decoding from the state reads exactly what decoding after a pixel prefill reads.
    answer = model.generate(input_ids=ids, video_state=state, max_new_tokens=4, do_sample=False)
    assert answer.shape[1] == ids.shape[1] + 4


def test_prompt_checks_with_a_state():
    model = tiny64()
    pixels, grid = tiny_video(2)
    state = model.encode_video(pixels, grid)
    with pytest.raises(ValueError, match="no prompt holds a <\\|vision_start\\|>"):
        model(input_ids=prompt(3, 3, visual=False)[None], video_state=state)
    with pytest.raises(ValueError, match="video_state or pixels"):
        model(input_ids=prompt(3, 3)[None], video_state=state, pixel_values_videos=pixels, video_grid_thw=grid)
    with pytest.raises(ValueError, match=r"state.to\('cpu'\)"):
        model(input_ids=prompt(3, 3)[None], video_state=state.to("meta"))
    with pytest.raises(ValueError, match="encoded in torch.float64"):
        model.float()(input_ids=prompt(3, 3)[None], video_state=state)


# -- extending a state ---------------------------------------------------------------------------------------------


def question_logits(model, state):
    return model(input_ids=prompt(4, 5, seed=3)[None], video_state=state).logits


def assert_states_equal(ours: VideoState, reference: VideoState, rtol, atol):
    assert ours.length == reference.length and torch.equal(ours.grid_thw, reference.grid_thw)
    ours, reference = ours.tensors(), reference.tensors()
    assert sorted(ours) == sorted(reference)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_encode_then_extend_equals_encoding_the_whole_video_tiny_float64(split):
    # Small Mamba-2 segments and chunks: the split falls inside a segment, at a segment's edge and inside a chunk.
    model = tiny64(**ROPE_AND_NORM, mamba_max_tokens=8)
    pixels, grid = tiny_video(6, seed=4)
    per_step = 16
    whole = model.encode_video(pixels, grid)
    first = model.encode_video(pixels[: split * per_step], torch.tensor([[split, 4, 4]]))
    extended = model.extend_video(first, pixels[split * per_step :], torch.tensor([[6 - split, 4, 4]]))
    # The PyTorch SSD scan computes in float32 whatever the model's dtype: a split that is not a chunk boundary
    # regroups its float32 sums (exact at a chunk boundary, 4 tokens per temporal step and 8 per chunk here).
    tolerance = dict(rtol=0, atol=0) if split % 2 == 0 else dict(rtol=1e-6, atol=1e-6)
    assert_states_equal(extended, whole, **tolerance)
    torch.testing.assert_close(question_logits(model, extended), question_logits(model, whole), **tolerance)
    # The state it grew from is unchanged.
    assert first.length == split * 4
    assert_states_equal(first, model.encode_video(pixels[: split * per_step], torch.tensor([[split, 4, 4]])), 0, 0)


@pytest.mark.parametrize("splits", [(1,), (3,), (1, 2, 6)])
def test_extending_in_steps_equals_encoding_the_whole_golden_video(splits):
    needs_golden()
    model, _ = load_golden(GOLDEN_DIR / "video_long", "sdpa")
    _, _, visual = golden_inputs(GOLDEN_DIR / "video_long")
    pixels, grid = visual["pixel_values_videos"], visual["video_grid_thw"]
    t, h, w = grid[0].tolist()
    whole = model.encode_video(pixels, grid)
    bounds = [0, *splits, t]
    state = model.encode_video(pixels[: bounds[1] * h * w], torch.tensor([[bounds[1], h, w]]))
    for start, end in zip(bounds[1:-1], bounds[2:]):
        state = model.extend_video(state, pixels[start * h * w : end * h * w], torch.tensor([[end - start, h, w]]))
    assert_states_equal(state, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(question_logits(model, state), question_logits(model, whole), rtol=1e-5, atol=1e-5)


def test_a_state_extended_two_ways_keeps_both():
    model = tiny64()
    base = model.encode_video(*tiny_video(2, seed=1))
    pixels_b, grid_b = tiny_video(2, seed=2)
    pixels_c, grid_c = tiny_video(2, seed=3)
    with_b = model.extend_video(base, pixels_b, grid_b)
    with_c = model.extend_video(base, pixels_c, grid_c)  # writes where with_b's frames would be if shared
    again_b = model.extend_video(model.encode_video(*tiny_video(2, seed=1)), pixels_b, grid_b)
    assert_states_equal(with_b, again_b, 0, 0)
    assert not torch.equal(with_c.tensors()["layers.0.key"], with_b.tensors()["layers.0.key"])


def test_extend_refuses_other_frame_sizes_and_images():
    model = tiny64()
    state = model.encode_video(*tiny_video(2))
    with pytest.raises(ValueError, match="8x4 patches but the state's are 4x4"):
        model.extend_video(state, *tiny_video(2, h=8))
    image_state = model.encode_image(*video_pixels(1, 4, 4))
    with pytest.raises(ValueError, match="state is of an image"):
        model.extend_video(image_state, *tiny_video(2))
    with pytest.raises(TypeError, match="VideoState"):
        model.extend_video({"keys": []}, *tiny_video(2))
    with pytest.raises(ValueError, match="encoded by another model"):
        tiny64(cross_attn_use_layer_norm=True).extend_video(state, *tiny_video(2))
    with pytest.raises(ValueError, match=r"state.to\('cpu'\)"):
        model.extend_video(state.to("meta"), *tiny_video(2))


# -- several questions on one state --------------------------------------------------------------------------------


def storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_two_questions_on_one_state_equal_two_fresh_runs_and_share_one_kv():
    model = tiny64(**ROPE_AND_NORM)
    pixels, grid = tiny_video(4)
    questions = [prompt(3, 5, seed=1), prompt(6, 2, seed=2)]
    fresh = [model.generate(input_ids=q[None], pixel_values_videos=pixels, video_grid_thw=grid, **GREEDY)
             for q in questions]
    state = model.encode_video(pixels, grid)
    one_after_the_other = [model.generate(input_ids=q[None], video_state=state, **GREEDY) for q in questions]
    for ours, reference in zip(one_after_the_other, fresh):
        assert_same_generation(ours, reference, rtol=1e-12, atol=1e-12)

    ids, mask = left_pad(questions)
    batch = model.generate(input_ids=ids, attention_mask=mask, video_state=state, **GREEDY)
    batch_pixels = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat([pixels] * 2),
                                  video_grid_thw=torch.cat([grid] * 2), **GREEDY)
    assert_same_generation(batch, batch_pixels, rtol=1e-10, atol=1e-10)
    for row, reference in enumerate(fresh):
        answer = batch.sequences[row, ids.shape[1]:]
        assert torch.equal(answer, reference.sequences[0, questions[row].shape[0]:])

    cache = getattr(batch, CACHE_NAME)
    kv, _ = state.cross_kv()
    for layer, (key, value) in cache.cross.kv.items():
        assert key.shape[0] == 1 and key.untyped_storage().data_ptr() == kv[layer][0].untyped_storage().data_ptr()
        assert storages([key, value]) == storages(kv[layer])
        read_key, _ = cache.cross.read(layer)
        assert read_key.shape[0] == 2 and read_key.stride(0) == 0  # a view of the one copy


def test_beams_over_pixels_encode_each_video_once_and_equal_per_beam_encoding():
    model = tiny64()
    videos = [tiny_video(4, seed=5), tiny_video(4, seed=6)]
    ids, mask = left_pad([prompt(3, 4, seed=1), prompt(5, 2, seed=2)])
    pixels, grid = torch.cat([v[0] for v in videos]), torch.cat([v[1] for v in videos])
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True,
                    return_dict_in_generate=True)
    vision_calls = []
    hook = model.visual.register_forward_hook(lambda module, args, out: vision_calls.append(args[1].shape[0]))
    shared = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid,
                            **settings)
    hook.remove()
    assert vision_calls == [2]  # one call, one encoding per distinct video (not per beam)
    # Per-beam encoding: visual_embeds are repeated with their rows, each copy run through every Mamba-2 block.
    embeds = [e.clone() for e in model.get_video_features(pixels, grid, return_dict=True).pooler_output]
    per_beam = model.generate(input_ids=ids, attention_mask=mask, visual_embeds=embeds, **settings)
    assert torch.equal(shared.sequences, per_beam.sequences)
    torch.testing.assert_close(shared.sequences_scores, per_beam.sequences_scores, rtol=1e-10, atol=1e-10)
    cache = getattr(shared, CACHE_NAME)
    assert all(key.shape[0] == 2 for key, _ in cache.cross.kv.values())
    assert cache.cross.row_group == 3  # each video's beams read its K/V together, none gathered per row


def test_beams_over_one_state_reorder_rows_not_kv():
    model = tiny64()
    pixels, grid = tiny_video(4)
    ids = prompt(4, 3)[None]
    settings = dict(max_new_tokens=5, num_beams=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    state = model.encode_video(pixels, grid)
    from_state = model.generate(input_ids=ids, video_state=state, **settings)
    from_pixels = model.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, **settings)
    assert torch.equal(from_state.sequences, from_pixels.sequences)
    torch.testing.assert_close(from_state.sequences_scores, from_pixels.sequences_scores, rtol=1e-12, atol=1e-12)
    cache = getattr(from_state, CACHE_NAME)
    kv, _ = state.cross_kv()
    assert all(storages(pair) == storages(kv[layer]) for layer, pair in cache.cross.kv.items())


# -- save, load, move ----------------------------------------------------------------------------------------------


def test_save_load_answer_equals(tmp_path):
    model = tiny64(**ROPE_AND_NORM)
    pixels, grid = tiny_video(4)
    sampling = {"timestamps": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5], "start_time": 0.0}
    state = model.encode_video(pixels, grid, sampling=sampling)
    path = tmp_path / "video.state"
    state.save(path)
    loaded = load_video_state(path, model)
    assert loaded.sampling == [sampling] and loaded.kind == "video" and loaded.length == state.length
    assert_states_equal(loaded, state, 0, 0)
    ids = prompt(3, 4)[None]
    assert_same_generation(model.generate(input_ids=ids, video_state=loaded, **GREEDY),
                           model.generate(input_ids=ids, video_state=state, **GREEDY), rtol=0, atol=0)
    # A loaded state keeps growing exactly as the original.
    more = tiny_video(2, seed=9)
    assert_states_equal(model.extend_video(loaded, *more), model.extend_video(state, *more), 0, 0)


def test_a_mismatched_state_is_refused(tmp_path):
    model = tiny64()
    path = tmp_path / "video.state"
    model.encode_video(*tiny_video(2)).save(path)
    other_weights = tiny64()
    with torch.no_grad():
        other_weights.model.layers[0].cross_attn.k_proj.weight.add_(1e-3)
    other_config = tiny64(cross_attn_use_layer_norm=True)
    for other in (other_weights, other_config):
        with pytest.raises(ValueError, match="encoded by another model .* encode the video again") as error:
            load_video_state(path, other)
        assert "\n" not in str(error.value)
    state = load_video_state(path, model)
    with pytest.raises(ValueError, match="encoded by another model"):
        other_weights(input_ids=prompt(2, 2)[None], video_state=state)

    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a Vamba video state"):
        load_video_state(tmp_path / "plain.safetensors", model)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = dict(file.metadata(), format_version="999")
    save_file(tensors, str(tmp_path / "future.state"), metadata=metadata)
    with pytest.raises(ValueError, match="format version '999'"):
        load_video_state(tmp_path / "future.state", model)


def test_to_moves_a_copy():
    model = tiny64()
    state = model.encode_video(*tiny_video(2))
    moved = state.to("meta")
    assert moved.device.type == "meta" and state.device.type == "cpu"
    back = state.to("cpu")
    assert_states_equal(back, state, 0, 0)
    assert state.nbytes() == sum(t.numel() * t.element_size() for t in state.tensors().values()) > 0




def test_a_stream_extended_chunk_by_chunk_equals_the_whole_video_processed_at_once():
    import importlib.util

    from vamba_hf.chat import video_pixels as processed
    from vamba_hf.demo import demo_frames
    from vamba_hf.inference import load_model_and_processor

    spec = importlib.util.spec_from_file_location("streaming_video", REPO / "examples" / "streaming_video.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    loaded = load_model_and_processor(None, dtype="float32", device="cpu")
    model, processor = loaded.model, loaded.processor
    frames = list(demo_frames(24))
    state = None
    for pixels, grid, _ in example.generator_rounds(processor, iter(frames), 8, model.device):
        state = model.encode_video(pixels, grid) if state is None else model.extend_video(state, pixels, grid)
    pixels, grid, _ = processed(processor, frames, model.device, num_frames=len(frames), progress=False)
    whole = model.encode_video(pixels, grid)
    assert state.grid_thw.tolist() == grid.tolist() == [[12, *grid[0, 1:].tolist()]]
    assert_states_equal(state, whole, rtol=1e-5, atol=1e-5)  # float32, chunk boundaries moved
    torch.testing.assert_close(question_logits(model, state), question_logits(model, whole), rtol=1e-5, atol=1e-5)


# -- vamba-hf chat in a terminal -----------------------------------------------------------------------------------

CHAT_PROMPT = b"> "


def chat_in_a_terminal(args: list, questions: list, timeout: float = 180.0):
    """Run `vamba-hf chat` with stdin and stdout on a pseudo-terminal, typing each question once the prompt shows,
    then Ctrl-D; returns (what the terminal showed, stderr, exit code)."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "vamba_hf.cli", "chat", *args], stdin=terminal,
                               stdout=terminal, stderr=subprocess.PIPE, env=env, close_fds=True)
    os.close(terminal)
    shown, to_type, deadline = b"", [q.encode() + b"\n" for q in questions] + [b"\x04"], time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    shown += os.read(controller, 4096)
                except OSError:  # the child closed the terminal
                    break
            if to_type and shown.count(CHAT_PROMPT) > len(questions) + 1 - len(to_type):
                os.write(controller, to_type.pop(0))
        stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))[1].decode()
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    return shown.decode(errors="replace"), stderr, process.returncode


def test_chat_answers_two_questions_from_one_encode(tmp_path):
    from vamba_hf.demo import write_demo_video

    video = write_demo_video(tmp_path / "clip.mp4")
    state_path = tmp_path / "clip.state"
    shown, stderr, code = chat_in_a_terminal(["--video", str(video), "--max-new-tokens", "6", "--save-state",
                                              str(state_path)], ["What happens?", "And at the end?"])
    assert code == 0, stderr
    assert stderr.count("Encoded the video once") == 1
    assert stderr.count("new tokens in") == 2 and stderr.count("from the encoded video") == 2
    assert shown.count("> ") == 3 and state_path.is_file()
    assert "Traceback" not in stderr

    shown, stderr, code = chat_in_a_terminal(["--state", str(state_path), "--max-new-tokens", "6"], ["Again?"])
    assert code == 0, stderr
    assert "Encoded the video once" not in stderr and "nothing encoded" in stderr
    assert stderr.count("new tokens in") == 1


def test_chat_errors_are_one_line(tmp_path):
    for args, expected in ((["--video", str(tmp_path / "missing.mp4")], "--video"),
                           ([], "chat needs --video"),
                           (["--state", str(tmp_path / "missing.state")], "--state")):
        result = subprocess.run([sys.executable, "-m", "vamba_hf.cli", "chat", *args], capture_output=True, text=True,
                                input="", timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("vamba-hf: error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert "Traceback" not in result.stderr


def test_reserved_room_is_filled_in_place_and_growth_keeps_older_states():
    model = tiny64()
    pixels, grid = tiny_video(2, seed=1)
    state = model.encode_video(pixels, grid, reserve_frames=4)  # 2 temporal steps of 4 tokens each
    buffer = state.keys[0].buffer
    assert buffer.shape[2] == state.length + 8
    grown = model.extend_video(state, *tiny_video(1, seed=2))
    assert grown.keys[0].buffer.data_ptr() == buffer.data_ptr()  # written in place
    grown = model.extend_video(grown, *tiny_video(1, seed=3))
    assert grown.keys[0].buffer.data_ptr() == buffer.data_ptr() and grown.length == state.length + 8
    beyond = model.extend_video(grown, *tiny_video(1, seed=4))
    assert beyond.keys[0].buffer.data_ptr() != buffer.data_ptr()  # no room left: a larger buffer
    parts = [tiny_video(2, seed=1)[0]] + [tiny_video(1, seed=seed)[0] for seed in (2, 3, 4)]
    whole = model.encode_video(torch.cat(parts), torch.tensor([[5, 4, 4]]))
    # The splits (8, 12, 16 tokens) are not all chunk boundaries (8 tokens): float32 scan sums regroup.
    assert_states_equal(beyond, whole, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reserve_frames=-1"):
        model.encode_video(pixels, grid, reserve_frames=-1)


def test_beams_over_pixels_with_a_text_only_row():
    model = tiny64(**ROPE_AND_NORM)
    pixels, grid = tiny_video(3, seed=7)
    ids, mask = left_pad([prompt(4, 3, seed=1, visual=False), prompt(3, 4, seed=2)])
    settings = dict(max_new_tokens=5, num_beams=2, num_return_sequences=2, do_sample=False,
                    return_dict_in_generate=True, output_scores=True)
    shared = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid,
                            **settings)
    pads = int((mask[0] == 0).sum())
    alone = [model.generate(input_ids=ids[:1, pads:], **settings),  # the text-only row without its padding
             model.generate(input_ids=ids[1:], pixel_values_videos=pixels, video_grid_thw=grid, **settings)]
    assert torch.equal(shared.sequences[2:], alone[1].sequences)
    assert torch.equal(shared.sequences[:2, pads:], alone[0].sequences)
    torch.testing.assert_close(shared.sequences_scores, torch.cat([a.sequences_scores for a in alone]), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("source,beams", [("state", 1), ("state", 3), ("two videos", 3)])
def test_the_static_decoding_step_reads_shared_kv(monkeypatch, source, beams):
    """The step a CUDA graph captures (run eagerly on the CPU here) reads shared K/V through the row index,
    reordered in place between steps; it answers as the plain cache does."""
    from vamba_hf.cache_vamba import DecodeGraph

    steps = []
    original = DecodeGraph.step
    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", True)
    monkeypatch.setattr(DecodeGraph, "step", lambda self, *a: steps.append(1) or original(self, *a))
    model = tiny64(**ROPE_AND_NORM)
    ids, mask = left_pad([prompt(3, 5, seed=1), prompt(6, 2, seed=2)])
    if source == "state":
        visual = {"video_state": model.encode_video(*tiny_video(3))}
    else:
        videos = [tiny_video(3, seed=seed) for seed in (1, 2)]
        visual = {"pixel_values_videos": torch.cat([v[0] for v in videos]),
                  "video_grid_thw": torch.cat([v[1] for v in videos])}
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=beams, do_sample=False,
                    output_scores=True, return_dict_in_generate=True, **visual)
    results = []
    for with_graph in (False, True):
        model.config.decode_with_cuda_graph = with_graph
        results.append(model.generate(**settings))
    assert steps  # the static step ran
    assert_same_generation(results[1], results[0], rtol=1e-12, atol=1e-12)
    if beams > 1:
        torch.testing.assert_close(results[1].sequences_scores, results[0].sequences_scores, rtol=1e-12, atol=1e-12)


def test_beams_over_pixels_from_inputs_embeds():
    model = tiny64()
    pixels, grid = tiny_video(3, seed=3)
    ids = prompt(4, 3)[None]
    settings = dict(max_new_tokens=4, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), pixel_values_videos=pixels,
                                 video_grid_thw=grid, **settings)
    from_ids = model.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, **settings)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(from_embeds.sequences_scores, from_ids.sequences_scores, rtol=1e-10, atol=1e-10)


def test_a_state_holds_no_more_memory_than_its_tensors():
    # A carry that is a view of its segment's in_proj output would keep that whole output alive with the state.
    model = tiny_model()
    pixels, grid = video_pixels(6, 4, 4)
    state = model.encode_video(pixels[:32], torch.tensor([[2, 4, 4]]))
    for current in (state, model.extend_video(state, pixels[32:], torch.tensor([[4, 4, 4]]))):
        for name, tensor in current.tensors().items():
            if name.endswith((".ssm_state", ".conv_inputs")):  # the K/V buffers keep room to grow, by design
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


# -- a saved state is untrusted input -------------------------------------------------------------------------------


def test_a_failed_state_write_is_reported_and_leaves_the_file_as_it_was(tmp_path):
    import resource

    state = tiny64().encode_video(*tiny_video(4))
    path = tmp_path / "video.state"
    path.write_text("the previous state")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # writes past 4 KiB fail (EFBIG), as on a full disk
    try:
        with pytest.raises(OSError, match=f"Could not write the video state to {path}") as error:
            state.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "\n" not in str(error.value)
    assert path.read_text() == "the previous state" and sorted(p.name for p in tmp_path.iterdir()) == ["video.state"]


@functools.lru_cache(maxsize=1)
def _states():
    """A tiny float32 model, and two of its states: one video, and two videos of different lengths (with a mask)."""
    model = tiny_model(cross_attn_use_position_embeddings=True)
    one = model.encode_video(*video_pixels(2, 4, 8), sampling={"video": "clip.mp4"})
    (a, grid_a), (b, grid_b) = video_pixels(2, 4, 8), video_pixels(2, 4, 4, seed=1)
    two = model.encode_video(torch.cat([a, b]), torch.cat([grid_a, grid_b]))
    assert two.keep is not None and one.keep is None
    return model, one, two


def _saved(state, folder: Path) -> tuple[dict, dict]:
    path = folder / "base.state"
    state.save(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return load_file(str(path)), dict(file.metadata())


def _write_state(path, tensors: dict, metadata: dict, forge: bool = False):
    """Write a (damaged) state; `forge`: with the digest recomputed for the damage, as a forger who knows the scheme
    would, so that only the structural checks stand between it and the model."""
    from vamba_hf.video_state_vamba import state_digest

    if forge:
        metadata = dict(metadata, digest=state_digest(metadata.get("model_fingerprint", ""), metadata, tensors))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path), metadata=metadata)


def _set(tensors, name, value):
    return {**tensors, name: value}


def _cut(tensor, tokens):
    return tensor.narrow(2, 0, tokens).clone()


def _other_model_state(folder):
    other = tiny_model(cross_attn_use_position_embeddings=True)
    with torch.no_grad():
        other.model.layers[1].vision_mixer.mixer.in_proj.weight.mul_(1.01)
    tensors, metadata = _saved(other.encode_video(*video_pixels(2, 4, 8), sampling={"video": "clip.mp4"}), folder)
    return tensors, dict(metadata, model_fingerprint=_states()[1].model_fingerprint)


# (name, which base state, damage (tensors, metadata) -> (tensors, metadata), structural: refused even when forged)
_DAMAGE = [
    ("K/V cut to fewer tokens", "one", lambda t, m: (_set(t, "layers.0.key", _cut(t["layers.0.key"], 10)), m), True),
    ("every K/V cut and the grid made to agree", "one",
     lambda t, m: ({**t, **{n: _cut(v, 8) for n, v in t.items() if n.endswith(("key", "value"))},
                    "grid_thw": torch.tensor([[1, 4, 8]])}, m), False),
    ("K zeroed", "one", lambda t, m: (_set(t, "layers.0.key", torch.zeros_like(t["layers.0.key"])), m), False),
    ("V times 1e30", "one", lambda t, m: (_set(t, "layers.1.value", t["layers.1.value"] * 1e30), m), False),
    ("a grid that contradicts the K/V", "one", lambda t, m: (_set(t, "grid_thw", torch.tensor([[4, 4, 8]])), m), True),
    ("a grid with h and w swapped", "one", lambda t, m: (_set(t, "grid_thw", torch.tensor([[2, 8, 4]])), m), False),
    ("a grid of floats", "one", lambda t, m: (_set(t, "grid_thw", t["grid_thw"].float()), m), True),
    ("a grid of zeros", "one", lambda t, m: (_set(t, "grid_thw", torch.zeros(1, 3, dtype=torch.long)), m), True),
    ("NaN in the SSM state", "one",
     lambda t, m: (_set(t, "layers.0.ssm_state", t["layers.0.ssm_state"].index_fill(1, torch.tensor([0]), float("nan"))),
                   m), True),
    ("inf in the conv inputs", "one",
     lambda t, m: (_set(t, "layers.0.conv_inputs", t["layers.0.conv_inputs"] * float("inf")), m), True),
    ("a keep mask on a state of one video", "one",
     lambda t, m: (_set(t, "keep", torch.ones(1, 1, t["layers.0.key"].shape[2], dtype=torch.bool)), m), True),
    ("a keep mask that is not the grid's", "two", lambda t, m: (_set(t, "keep", torch.ones_like(t["keep"])), m), True),
    ("the keep mask dropped", "two", lambda t, m: ({n: v for n, v in t.items() if n != "keep"}, m), True),
    ("K/V in another dtype", "one", lambda t, m: (_set(t, "layers.0.key", t["layers.0.key"].half()), m), True),
    ("a tensor missing", "one", lambda t, m: ({n: v for n, v in t.items() if n != "layers.1.value"}, m), True),
    ("no grid", "one", lambda t, m: ({n: v for n, v in t.items() if n != "grid_thw"}, m), True),
    ("an unknown tensor", "one", lambda t, m: (_set(t, "layers.7.key", t["layers.0.key"].clone()), m), True),
    ("an SSM state of another shape", "one",
     lambda t, m: (_set(t, "layers.0.ssm_state", t["layers.0.ssm_state"][:, :4].clone()), m), True),
    ("the kind 'movie'", "one", lambda t, m: (t, dict(m, kind="movie")), True),
    ("the dtype 'load'", "one", lambda t, m: (t, dict(m, dtype="load")), True),
    ("sampling that is not JSON", "one", lambda t, m: (t, dict(m, sampling="{")), True),
    ("sampling of another video", "one", lambda t, m: (t, dict(m, sampling='[{"video": "other.mp4"}]')), False),
    ("no digest", "one", lambda t, m: (t, {k: v for k, v in m.items() if k != "digest"}), False),
    ("another model's state carrying this model's fingerprint string", "other", None, False),
]


@pytest.mark.parametrize("name, base, damage, forge", [
    (name, base, damage, forge) for name, base, damage, structural in _DAMAGE
    for forge in ((False, True) if structural else (False,))  # else only the digest tells the damage apart
], ids=[f"{name}{' (forged digest)' if forge else ''}" for name, _, _, structural in _DAMAGE
        for forge in ((False, True) if structural else (False,))])
def test_damaged_and_foreign_states_are_refused_in_one_line(tmp_path, name, base, damage, forge):
    model, one, two = _states()
    if base == "other":
        tensors, metadata = _other_model_state(tmp_path)
    else:
        tensors, metadata = damage(*_saved(one if base == "one" else two, tmp_path))
    path = tmp_path / "damaged.state"
    _write_state(path, tensors, metadata, forge)
    with pytest.raises(ValueError) as error:
        load_video_state(path, model)
    message = str(error.value)
    assert message.startswith(f"{path} ") and "\n" not in message, message


def test_the_undamaged_states_load_and_answer_as_before(tmp_path):
    model, one, two = _states()
    for state in (two, one):
        path = tmp_path / "state"
        _write_state(path, *_saved(state, tmp_path))
        assert_states_equal(load_video_state(path, model), state, 0, 0)
    ids = prompt(3, 4)[None]
    assert_same_generation(model.generate(input_ids=ids, video_state=load_video_state(path, model), **GREEDY),
                           model.generate(input_ids=ids, video_state=one, **GREEDY), rtol=0, atol=0)


_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
                 torch.uint8, torch.float8_e4m3fn)


@st.composite
def _damage(draw, names):
    """One change to a state file's tensors, drawn over names, shapes, dtypes and values."""
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["drop", "rename", "shape", "dtype", "scale", "element"]))
    if kind == "drop":
        return kind, name, None
    if kind == "rename":
        return kind, name, draw(st.sampled_from(["layers.0.key", "layers.1.value", "layers.2.key", "layers.0.ssm_state",
                                                 "layers.1.ssm_state", "keep", "grid_thw", "key", "layers.-1.key"])
                                | st.text(min_size=1, max_size=12))
    if kind == "shape":
        return kind, name, draw(st.lists(st.integers(0, 20), min_size=0, max_size=5))
    if kind == "dtype":
        return kind, name, draw(st.sampled_from(_STATE_DTYPES))
    value = draw(st.sampled_from([0.0, -1.0, 1.0, 0.5, 1e30, -1e30, float("nan"), float("inf"), 2.0, 1e-30]))
    return kind, name, (value, draw(st.integers(0, 10**6)))


def _damaged(tensors: dict, damage) -> dict:
    kind, name, arg = damage
    tensors = dict(tensors)
    tensor = tensors.pop(name)
    if kind == "rename":
        tensors[arg] = tensor
    elif kind == "shape":
        tensors[name] = (torch.rand(arg) * 4).to(tensor.dtype)
    elif kind == "dtype":
        tensors[name] = tensor.to(arg)
    elif kind == "scale":
        tensors[name] = tensor * torch.tensor(arg[0]).to(tensor.dtype) if tensor.numel() else tensor
    elif kind == "element":
        tensor = tensor.clone()
        if tensor.numel():
            tensor.view(-1)[arg[1] % tensor.numel()] = torch.tensor(arg[0]).to(tensor.dtype)
        tensors[name] = tensor
    return tensors


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["one", "two"]), forge=st.booleans())
def test_any_change_to_a_state_is_refused_in_one_line_or_changes_nothing(data, which, forge):
    """The only outcomes: our one-line ValueError naming the file, or a state that is the one saved (an unforged
    change that changed no byte) or, forged, one whose structure is sound and that answers."""
    import tempfile

    model, one, two = _states()
    state = one if which == "one" else two
    with tempfile.TemporaryDirectory() as folder:
        tensors, metadata = _saved(state, Path(folder))
        damage = data.draw(_damage(sorted(tensors)))
        changed = _damaged(tensors, damage)
        path = Path(folder) / "damaged.state"
        _write_state(path, changed, metadata, forge)
        try:
            loaded = load_video_state(path, model)
        except ValueError as error:
            assert str(error).startswith(f"{path} ") and "\n" not in str(error), (damage, str(error))
            return
    if forge:
        assert {name: (t.shape, t.dtype) for name, t in loaded.tensors().items()} == {
            name: (t.shape, t.dtype) for name, t in state.tensors().items()}, damage
        if loaded.num_entries == 1:
            model.generate(input_ids=prompt(3, 4)[None], video_state=loaded, max_new_tokens=2, do_sample=False)
    else:
        assert_states_equal(loaded, state, 0, 0)


# -- one visual step per layer ---------------------------------------------------------------------------------------


def test_the_state_module_calls_the_layers_visual_step_only():
    """The state module keeps storage, save/load and fingerprints; the visual half of a layer is the layer's own."""
    import ast

    tree = ast.parse((REPO / "src" / "vamba_hf" / "video_state_vamba.py").read_text())
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    internals = {"layers", "input_layernorm", "cross_attn", "vision_mixer", "mixer", "continue_stream",
                 "keys_values", "positions"}
    assert attributes & internals == set()
    assert {"visual_steps", "carry_shapes"} <= attributes


def test_prefill_encode_and_extend_run_each_layers_visual_step(monkeypatch):
    from vamba_hf.decoder_vamba import VambaDecoderLayer

    model = tiny_model(**ROPE_AND_NORM)
    layers = model.config.num_hidden_layers
    calls = []
    step = VambaDecoderLayer.visual_step
    monkeypatch.setattr(VambaDecoderLayer, "visual_step",
                        lambda layer, *args, **kwargs: calls.append(layer.layer_idx) or step(layer, *args, **kwargs))
    pixels, grid = video_pixels(6, 4, 4)
    with torch.no_grad():
        model(input_ids=prompt(1, 2)[None], pixel_values_videos=pixels[:32], video_grid_thw=torch.tensor([[2, 4, 4]]))
    assert calls == list(range(layers))
    state = model.encode_video(pixels[:32], torch.tensor([[2, 4, 4]]))
    model.extend_video(state, pixels[32:], torch.tensor([[4, 4, 4]]))
    assert calls == list(range(layers)) * 3
