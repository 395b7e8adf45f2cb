"""The model: parity with the original implementation (golden fixtures), with a naive float64 re-derivation for
the options the fixtures do not cover, and generation/batching/loading behaviour."""

import filecmp
import json
import math

import pytest
import torch
import transformers
from conftest import REPO, golden_cases
from helpers import (golden_inputs, left_pad, load_golden, prompt, relative_error, tiny_config, tiny_model,
                     video_pixels)
from reference_vamba import reference_logits
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from vamba_hf import VambaConfig, VambaForConditionalGeneration, VambaModel
from vamba_hf.cache_vamba import VambaCache
from vamba_hf.mamba2_vamba import Mamba2, ssd_scan_torch

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


# --- parity with the original implementation ---------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", golden_cases())
def test_golden_parity(golden_dir, case, attn):
    folder = golden_dir / case
    model, info = load_golden(folder, attn)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = load_file(str(folder / "reference_outputs.safetensors"))
    input_ids, attention_mask, visual = golden_inputs(folder)
    pixels = visual.get("pixel_values_videos", visual.get("pixel_values"))
    grid = visual.get("video_grid_thw", visual.get("image_grid_thw"))
    with torch.no_grad():
        embeds = model.encode_visual(pixels, grid)[0]
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    **visual)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True, **visual)

    assert relative_error(embeds, ref["visual_embeds"]) <= 5e-4
    for i in range(4):
        assert relative_error(out.hidden_states[i], ref[f"text_hidden_{i}"]) <= 1e-4, i
    assert out.logits.dtype == torch.float32
    assert relative_error(out.logits, ref["logits"]) <= 1e-4
    assert relative_error(torch.stack(generated.scores, 1), ref["generate_scores"]) <= 1e-4
    assert torch.equal(generated.sequences, ref["generated_ids"])


@pytest.mark.parametrize("case", golden_cases())
def test_cached_generation_equals_uncached_argmax_loop(golden_dir, case):
    model, _ = load_golden(golden_dir / case, "sdpa")
    input_ids, attention_mask, visual = golden_inputs(golden_dir / case)
    with torch.no_grad():
        cached = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8,
                                do_sample=False, **visual)
        ids = input_ids
        for _ in range(8):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **visual).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_official_config_formats_load(golden_dir):
    config = VambaConfig.from_pretrained(golden_dir / "video_short")
    assert config.model_type == "vamba"
    assert config.vision_config.depth == 2 and config.vision_config.patch_size == 14  # diff + default
    assert config.vision_mamba_mixer_config.chunk_size == 16 and config.vision_mamba_mixer_config.d_conv == 4
    assert config.mrope_section == [2, 3, 3]
    mrope_spelling = VambaConfig(**{**config.to_dict(), "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}})
    assert mrope_spelling.mrope_section == [2, 3, 3]


def test_saved_config_is_strict_json_that_either_transformers_reads(tmp_path):
    """dt_limit's infinite bound: transformers 4 writes a bare Infinity, 5 an object that 4 cannot read; a Hub repo is
    read by both."""
    VambaConfig().save_pretrained(tmp_path)

    def no_constants(name):
        raise AssertionError(f"config.json holds {name}, which is not JSON")

    saved = json.loads((tmp_path / "config.json").read_text(), parse_constant=no_constants)
    assert "__float__" not in json.dumps(saved)
    assert VambaConfig.from_pretrained(tmp_path).vision_mamba_mixer_config.dt_limit == (0.0, math.inf)
    written_by_transformers_5 = {**saved["vision_mamba_mixer_config"], "dt_limit": [0.0, {"__float__": "Infinity"}]}
    assert VambaConfig(vision_mamba_mixer_config=written_by_transformers_5).vision_mamba_mixer_config.dt_limit == (
        0.0, math.inf)


def test_importing_the_package_registers_the_auto_classes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is VambaConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is VambaModel
    assert type(transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)) is VambaForConditionalGeneration


# --- the options the golden fixtures do not cover, against a naive float64 re-derivation ---------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(cross_attn_use_position_embeddings=True),
        dict(cross_attn_use_layer_norm=True),
        dict(use_alpha_balancing=False),
        dict(cross_attn_use_position_embeddings=True, cross_attn_use_layer_norm=True, use_alpha_balancing=False),
        dict(vision_mamba_mixer_config=dict(hidden_dim=64, d_state=16, headdim=16, chunk_size=8, enable=False)),
        dict(vision_mamba_mixer_config=dict(hidden_dim=64, d_state=8, headdim=8, chunk_size=4, ngroups=2)),
    ],
)
def test_options_match_naive_reference(options):
    model = tiny_model(**options)
    pixels, grid = video_pixels(4, 4, 6)
    input_ids = prompt(3, 5)[None]
    with torch.no_grad():
        visual = model.encode_visual(pixels, grid)[0]
        ours = model(input_ids=input_ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=False).logits
    t, h, w = 4, 2, 3
    positions = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    ref = reference_logits(model.state_dict(), model.config, input_ids[0], visual, positions.reshape(3, -1))
    assert relative_error(ours[0], ref) <= 1e-5


# --- the Mamba-2 scan ----------------------------------------------------------------------------------------------


def naive_scan(x, dt, A, B, C):
    heads, groups = x.shape[2], B.shape[2]
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[3]).double()
    ys = []
    for t in range(x.shape[1]):
        Bt, Ct = (m[:, t].repeat_interleave(heads // groups, 1).double() for m in (B, C))
        decay = torch.exp(dt[:, t].double() * A.double())[..., None, None]
        state = decay * state + (dt[:, t, :, None].double() * x[:, t].double())[..., None] * Bt[:, :, None]
        ys.append((state @ Ct[..., None])[..., 0])
    return torch.stack(ys, 1), state


def random_scan_inputs(batch=2, length=37, heads=4, headdim=8, groups=2, state=6):
    x = torch.randn(batch, length, heads, headdim)
    dt = torch.rand(batch, length, heads) * 0.5
    A = -torch.rand(heads) * 2 - 0.1
    B, C = torch.randn(batch, length, groups, state), torch.randn(batch, length, groups, state)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_chunked_scan_equals_recurrence_for_any_chunk_size(chunk_size):
    x, dt, A, B, C = random_scan_inputs()
    y, final = ssd_scan_torch(x, dt, A, B, C, chunk_size)
    y_ref, final_ref = naive_scan(x, dt, A, B, C)
    assert relative_error(y, y_ref) <= 1e-5 and relative_error(final, final_ref) <= 1e-5


def test_scan_with_initial_state_continues_the_sequence():
    x, dt, A, B, C = random_scan_inputs(length=40)
    whole, final = ssd_scan_torch(x, dt, A, B, C, 8)
    first, state = ssd_scan_torch(x[:, :17], dt[:, :17], A, B[:, :17], C[:, :17], 8)
    second, final_split = ssd_scan_torch(x[:, 17:], dt[:, 17:], A, B[:, 17:], C[:, 17:], 8, initial_state=state)
    assert relative_error(torch.cat([first, second], 1), whole) <= 1e-5
    assert relative_error(final_split, final) <= 1e-5


def test_scan_resets_state_at_sequence_boundaries():
    x, dt, A, B, C = random_scan_inputs(batch=1, length=30)
    seq_idx = torch.tensor([[0] * 11 + [1] * 13 + [2] * 6])
    y, _ = ssd_scan_torch(x, dt, A, B, C, 8, seq_idx=seq_idx)
    pieces = [ssd_scan_torch(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], 8)[0] for a, b in [(0, 11), (11, 24),
                                                                                                (24, 30)]]
    assert relative_error(y, torch.cat(pieces, 1)) <= 1e-5


def test_mixer_in_segments_equals_one_pass():
    whole = tiny_model().model.layers[0].vision_mixer.mixer
    segmented = Mamba2(whole.config, max_tokens=16)
    segmented.load_state_dict(whole.state_dict())
    u = torch.randn(2, 75, 64)
    seq_idx = torch.tensor([[0] * 30 + [1] * 45, [0] * 75])
    with torch.no_grad():
        assert relative_error(segmented(u), whole(u)) <= 1e-5
        assert relative_error(segmented(u, seq_idx), whole(u, seq_idx)) <= 1e-5
        separate = torch.cat([whole(u[:1, :30]), whole(u[:1, 30:])], 1)
        assert relative_error(whole(u, seq_idx)[:1], separate) <= 1e-5


# --- batching ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_equals_one_by_one(attn):
    model = tiny_model()
    model.config._attn_implementation = attn
    rows = [prompt(2, 6, seed=1), prompt(4, 1, seed=2, visual=False), prompt(0, 3, seed=3)]
    videos = [video_pixels(4, 4, 6, seed=1), video_pixels(2, 6, 4, seed=2)]  # for rows 0 and 2
    ids, mask = left_pad(rows)
    pixels = torch.cat([v[0] for v in videos])
    grids = torch.cat([v[1] for v in videos])
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels,
                                 video_grid_thw=grids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        batched_logits = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels,
                               video_grid_thw=grids).logits
        single_video = {0: videos[0], 2: videos[1]}
        for i, row in enumerate(rows):
            visual = {}
            if i in single_video:
                visual = dict(pixel_values_videos=single_video[i][0], video_grid_thw=single_video[i][1])
            alone = model.generate(input_ids=row[None], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   **visual)
            assert torch.equal(batched[i, ids.shape[1] - len(row):], alone[0]), i
            alone_logits = model(input_ids=row[None], **visual).logits[0]
            assert relative_error(batched_logits[i, ids.shape[1] - len(row):], alone_logits) <= 1e-5


def test_text_only_prompt_generates_without_cross_attention():
    model = tiny_model()
    ids = prompt(5, 0, visual=False)[None]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
        manual = ids
        for _ in range(4):
            logits = model(input_ids=manual, use_cache=False).logits
            manual = torch.cat([manual, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, manual)


# --- generation features ----------------------------------------------------------------------------------------------


def test_generation_modes():
    model = tiny_model()
    pixels, grid = video_pixels(4, 4, 6)
    ids = prompt(2, 4)[None]
    inputs = dict(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None)
        one_beam = model.generate(**inputs, max_new_tokens=5, num_beams=1, do_sample=False, eos_token_id=None)
        assert torch.equal(greedy, one_beam)
        beams = model.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
                               eos_token_id=None, return_dict_in_generate=True, output_scores=True)
        assert beams.sequences.shape == (2, ids.shape[1] + 5)
        # The best beam's score is the summed log-probability of its own tokens under an uncached forward.
        best = beams.sequences[:1]
        logits = model(input_ids=best, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=False).logits
        logprobs = logits[0, ids.shape[1] - 1 : -1].log_softmax(-1)
        own = logprobs.gather(-1, best[0, ids.shape[1]:, None]).sum()
        assert math.isclose(beams.sequences_scores[0].item() * 5, own.item(), rel_tol=1e-4)

        torch.manual_seed(3)
        sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=2)
        torch.manual_seed(3)
        again = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=2)
        assert torch.equal(sampled, again)

        first = int(greedy[0, ids.shape[1]])
        stopped = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=[999, first])
        assert stopped.shape[1] == ids.shape[1] + 1


def test_streamer_receives_the_generated_tokens():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    ids = prompt(1, 2)[None]
    streamer = Collect()
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, max_new_tokens=4,
                             do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert sum(streamer.chunks[1:-1], []) == out[0, ids.shape[1]:].tolist()


def test_decode_steps_do_not_rerun_the_vision_tower_or_mamba():
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    calls = {"vision": 0, "mamba": 0}
    model.visual.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    for layer in model.model.layers:
        layer.vision_mixer.register_forward_hook(lambda *_: calls.__setitem__("mamba", calls["mamba"] + 1))
    with torch.no_grad():
        model.generate(input_ids=prompt(1, 2)[None], pixel_values_videos=pixels, video_grid_thw=grid,
                       max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert calls == {"vision": 1, "mamba": model.config.num_hidden_layers - 1}


def test_cache_holds_cross_attention_kv_per_layer():
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    with torch.no_grad():
        out = model(input_ids=prompt(1, 2)[None], pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, VambaCache) and sorted(cache.cross.kv) == [0, 1]
    key, value = cache.cross.kv[0]
    assert key.shape == (1, 2, 8, 16) and value.shape == (1, 2, 8, 16)


def test_cache_argument_is_read_under_either_name():
    """transformers 5.24 passes the cache to forward as `cache`; earlier releases as `past_key_values`. A decoding
    step must read it under both names (a lost cache re-runs the step without the prompt, silently)."""
    from vamba_hf.modeling_vamba import CACHE_NAME

    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    ids = prompt(1, 2)[None]
    next_token = torch.tensor([[7]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, next_token], 1), pixel_values_videos=pixels, video_grid_thw=grid)
        for name in ("cache", "past_key_values"):
            out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            step = model(input_ids=next_token, use_cache=True, **{name: cache})
            assert relative_error(step.logits[:, -1], full.logits[:, -1]) < 1e-5, name
        with pytest.raises(ValueError, match="given twice"):
            model(input_ids=next_token, cache=cache, past_key_values=cache)


# --- loading, saving, dtypes -----------------------------------------------------------------------------------------


def test_save_and_load_through_the_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert {"configuration_vamba.py", "modeling_vamba.py"} <= {p.name for p in tmp_path.iterdir()}
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(config).__name__ == "VambaConfig" and config.model_type == "vamba"
    auto_names = ["AutoModelForImageTextToText"] + ([] if TRANSFORMERS_5 else ["AutoModelForVision2Seq"])
    pixels, grid = video_pixels(2, 4, 4)
    inputs = dict(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels, video_grid_thw=grid)
    with torch.no_grad():
        expected = model(**inputs).logits
        for name in auto_names:
            loaded, info = getattr(transformers, name).from_pretrained(tmp_path, trust_remote_code=True,
                                                                       output_loading_info=True)
            assert type(loaded).__name__ == "VambaForConditionalGeneration"
            assert not info["missing_keys"] and not info["unexpected_keys"]
            assert torch.equal(loaded.eval()(**inputs).logits, expected)
        base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(base).__name__ == "VambaModel"
        hidden = base.eval()(**inputs).last_hidden_state
    assert torch.allclose(model.lm_head(hidden), expected, atol=1e-6)


def test_bf16_load_returns_fp32_logits(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = VambaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    pixels, grid = video_pixels(2, 4, 4)
    with torch.no_grad():
        logits = model(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels, video_grid_thw=grid).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_hub_files_are_the_package_files():
    """The repository root is a loadable Hub folder: every remote-code module of the package is there too."""
    remote_code = sorted(path.name for path in (REPO / "src" / "vamba_hf").glob("*_vamba.py"))
    assert {"configuration_vamba.py", "modeling_vamba.py", "processing_vamba.py"} <= set(remote_code)
    for name in remote_code:
        assert filecmp.cmp(REPO / name, REPO / "src" / "vamba_hf" / name, shallow=False), name


def test_cpu_runs_the_torch_mamba_path():
    assert tiny_model().mamba_backend == "torch"


def test_missing_kernels_warn_once_with_the_fix(monkeypatch):
    import vamba_hf.mamba2_vamba as mamba2
    import vamba_hf.modeling_vamba as modeling

    monkeypatch.setattr(mamba2, "_MAMBA_SSM_ERROR", "ImportError: selective_scan_cuda.so: undefined symbol")
    monkeypatch.setattr(mamba2, "_TRITON_ERROR", "ImportError: no module named triton")
    messages = []
    monkeypatch.setattr(modeling.logger, "warning", lambda message, *a, **k: messages.append(message))
    model = tiny_model()
    model._check_kernels(torch.device("cuda"))
    model._check_kernels(torch.device("cuda"))
    assert len(messages) == 1
    assert "selective_scan_cuda" in messages[0] and "pip install 'vamba-hf[cuda]'" in messages[0]
    assert mamba2.kernels_unavailable_reason(torch.device("cuda")).startswith("mamba-ssm is not usable")


# --- clear errors ----------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    ids = prompt(1, 2)[None]
    with pytest.raises(ValueError, match="without `video_grid_thw`"):
        model(input_ids=ids, pixel_values_videos=pixels)
    with pytest.raises(ValueError, match="describes 32 patches but the video pixels hold 64"):
        model(input_ids=ids, pixel_values_videos=torch.cat([pixels, pixels]), video_grid_thw=grid)
    with pytest.raises(ValueError, match="0 <\\|vision_start\\|> placeholder\\(s\\) but 1"):
        model(input_ids=prompt(3, 0, visual=False)[None], pixel_values_videos=pixels, video_grid_thw=grid)
    with pytest.raises(ValueError, match="1 <\\|vision_start\\|> placeholder\\(s\\) but 0"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="more than one <\\|vision_start\\|>"):
        model(input_ids=torch.cat([ids, ids], 1), pixel_values_videos=torch.cat([pixels, pixels]),
              video_grid_thw=torch.cat([grid, grid]))
    with pytest.raises(ValueError, match="mixes images and videos"):
        image_pixels, image_grid = video_pixels(1, 4, 4)
        model(input_ids=torch.cat([ids, ids]), pixel_values_videos=pixels, video_grid_thw=grid,
              pixel_values=image_pixels, image_grid_thw=image_grid)
    with pytest.raises(ValueError, match="`attention_mask` has shape \\(2, 5\\) but the input has batch size 1"):
        model(input_ids=ids, attention_mask=torch.ones(2, ids.shape[1]), pixel_values_videos=pixels,
              video_grid_thw=grid)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(hidden_size=66), "must be divisible by num_attention_heads"),
        (dict(mrope_section=[2, 3, 4]), "must have three entries summing to head_dim/2 = 8"),
        (dict(vision_mamba_mixer_config=dict(hidden_dim=64, headdim=48)), "head count is inconsistent"),
        (dict(vision_mamba_mixer_config=dict(hidden_dim=64, d_stat=16)), "Unknown key\\(s\\) in the "
                                                                          "vision_mamba_mixer_config: \\['d_stat'\\]"),
        (dict(vision_config=dict(hidden_size=64, depthh=2)), "Unknown key\\(s\\) in the vision_config"),
        (dict(cross_attn_use_layernorm=True), "Unknown key\\(s\\) in the Vamba config"),
        (dict(vision_config=dict(hidden_size=32)), "must equal the text hidden_size"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**settings)


def test_missing_weights_are_reported(tmp_path, golden_dir):
    import shutil

    from safetensors.torch import save_file

    for name in ("config.json", "generation_config.json"):
        shutil.copy(golden_dir / "image" / name, tmp_path / name)
    weights = load_file(str(golden_dir / "image" / "model.safetensors"))
    weights.pop("model.layers.1.vision_mixer.mixer.A_log")
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, info = VambaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and "model.layers.1.vision_mixer.mixer.A_log" in set(info["missing_keys"])


def test_bare_model_returns_text_hidden_states():
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    base = VambaModel(model.config).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")})
    with torch.no_grad():
        hidden = base(input_ids=prompt(1, 2)[None], pixel_values_videos=pixels, video_grid_thw=grid)
    assert hidden.last_hidden_state.shape == (1, 5, 64)


def test_qwen2_vl_vision_key_spellings_are_accepted():
    config = tiny_config(vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, in_chans=3,
                                            spatial_patch_size=14))
    assert config.vision_config.in_channels == 3 and config.vision_config.patch_size == 14
    with pytest.raises(ValueError, match="spatial_patch_size=16 and patch_size=14"):
        tiny_config(vision_config=dict(hidden_size=64, spatial_patch_size=16, patch_size=14))


def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path):
    """save_pretrained writes every module the remote code imports; transformers loads them from the folder alone."""
    import subprocess
    import sys

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    pixels, grid = video_pixels(2, 4, 4)
    inputs = dict(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels, video_grid_thw=grid)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "expected.pt")
    script = f"""
import sys

class NoVambaHf:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vamba_hf":
            raise ImportError("vamba_hf is not installed here")

sys.meta_path.insert(0, NoVambaHf())
import torch, transformers
folder = {str(tmp_path)!r}
model = transformers.AutoModelForImageTextToText.from_pretrained(folder + "/model", trust_remote_code=True).eval()
assert not type(model).__module__.startswith("vamba_hf"), type(model).__module__
with torch.no_grad():
    logits = model(**torch.load(folder + "/inputs.pt")).logits
assert torch.equal(logits, torch.load(folder + "/expected.pt"))
print("loaded from", type(model).__module__)
"""
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded from transformers_modules" in run.stdout
