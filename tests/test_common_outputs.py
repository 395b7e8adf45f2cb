"""What transformers' common model tests ask of a VLM's outputs and RoPE, in their idiom: get_image/video_features
return the vision encoder's BaseModelOutputWithPooling on transformers 5 (Qwen2-VL's per-item tuple on 4), with
`return_dict`, `output_hidden_states` and `output_attentions`; the forward returns `image_outputs` /
`video_outputs`; hidden states and attentions are recorded by transformers' output capturing where the installed
line has it; RoPE scaling is applied as Qwen2-VL applies it, or refused."""

import pytest
import torch
import transformers
from helpers import prompt, tiny_model, video_pixels
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.configuration_vamba import VambaConfigError
from vamba_hf.modeling_vamba import FEATURES_AS_OUTPUT, capture_outputs
from vamba_hf.tiny import tiny_config

ITEMS = [(2, 4, 6), (2, 4, 4)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def pixels_of(grids, seed=0):
    parts = [video_pixels(*grid, seed=seed + i) for i, grid in enumerate(grids)]
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


@pytest.mark.parametrize("kind", ["video", "image"])
def test_features_are_the_vision_encoder_output(model, kind):
    grids = ITEMS if kind == "video" else [(1, 4, 6), (1, 4, 4)]
    pixels, grid = pixels_of(grids)
    features = getattr(model, f"get_{kind}_features")
    merged = model.config.vision_config.spatial_merge_size ** 2
    with torch.no_grad():
        out = features(pixels, grid, return_dict=True)
        as_tuple = features(pixels, grid, return_dict=False)
        default = features(pixels, grid)
        hidden = features(pixels, grid, output_hidden_states=True, return_dict=True)
        attentions = features(pixels, grid, output_attentions=True, return_dict=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert [p.shape for p in out.pooler_output] == [(t * h * w // merged, model.config.hidden_size)
                                                    for t, h, w in grids]
    assert out.last_hidden_state.shape == (pixels.shape[0], model.config.vision_config.embed_dim)
    assert out.hidden_states is None and out.attentions is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    if FEATURES_AS_OUTPUT:
        assert isinstance(default, BaseModelOutputWithPooling)
    else:  # transformers 4: Qwen2-VL's tuple of per-item features
        assert isinstance(default, tuple) and all(torch.equal(a, b) for a, b in zip(default, out.pooler_output))
    depth = len(model.visual.blocks)
    assert len(hidden.hidden_states) == depth + 1 and torch.equal(hidden.hidden_states[-1], out.last_hidden_state)
    assert all(h.shape == out.last_hidden_state.shape for h in hidden.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(hidden.pooler_output, out.pooler_output))
    assert len(attentions.attentions) == depth
    heads = model.config.vision_config.num_heads
    for block in attentions.attentions:  # per item (one group of frames each): attention within each frame
        assert [weights.shape for weights in block] == [(t, heads, h * w, h * w) for t, h, w in grids]
        for weights in block:
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_the_forward_returns_the_encoder_output_of_its_videos(model):
    pixels, grid = pixels_of(ITEMS)
    ids = torch.stack([prompt(2, 3, seed=1), prompt(2, 3, seed=2)])
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)
        out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, output_hidden_states=True,
                    output_attentions=True)
        features = model.get_video_features(pixels, grid, return_dict=True)
    assert out.image_outputs is None and isinstance(out.video_outputs, BaseModelOutputWithPooling)
    assert len(out.video_outputs.pooler_output) == ids.shape[0]
    for ours, reference in zip(out.video_outputs.pooler_output, features.pooler_output):
        torch.testing.assert_close(ours, reference)  # the forward asked for attentions: eager, not SDPA
    assert len(out.video_outputs.hidden_states) == len(model.visual.blocks) + 1
    assert len(out.video_outputs.attentions) == len(model.visual.blocks)
    # Without them, the vision tower's states are not kept (a long video's patches would be held to the end).
    assert plain.video_outputs is None
    torch.testing.assert_close(out.logits, plain.logits)


# -- recorded outputs -----------------------------------------------------------------------------------------------


def video_prompt():
    pixels, grid = video_pixels(2, 4, 6)
    return dict(input_ids=prompt(2, 4)[None], pixel_values_videos=pixels, video_grid_thw=grid)


def test_hidden_states_are_selected_by_index_where_transformers_records_them(model):
    """transformers >= 5.2 records the layers' outputs with the hooks a model declares in `_can_record_outputs`;
    `output_hidden_states` may then name the hidden states to keep (negative: from the end), the others are None."""
    if capture_outputs is None:
        pytest.skip(f"transformers {transformers.__version__} has no output capturing; the text model collects them")
    with torch.no_grad():
        full = model(**video_prompt(), output_hidden_states=True)
        some = model(**video_prompt(), output_hidden_states=[0, -1])
    count = model.config.num_hidden_layers + 1
    assert len(full.hidden_states) == len(some.hidden_states) == count
    assert some.hidden_states[1:-1] == (None,) * (count - 2)
    for i in (0, -1):
        torch.testing.assert_close(some.hidden_states[i], full.hidden_states[i])


@pytest.mark.parametrize("base", [True, False])
def test_recorded_outputs_are_the_layers_and_follow_the_config(model, base):
    """Hidden states: the embeddings, each layer's output, the normed last one; attentions and cross-attentions one
    per layer. A flag passed as None (as the head passes it on) is read from the config."""
    forward = super(type(model), model).forward if base else model.forward
    inputs = video_prompt()
    with torch.no_grad():
        asked = forward(**inputs, output_hidden_states=True, output_attentions=True)
        model.config.output_hidden_states = True  # (output_attentions in the config asks for eager attention)
        try:
            from_config = forward(**inputs, output_hidden_states=None, output_attentions=True)
            as_tuple = forward(**inputs, output_attentions=True, return_dict=False)
        finally:
            model.config.output_hidden_states = False
        embeddings = model.model.embed_tokens(inputs["input_ids"])
    layers = model.config.num_hidden_layers
    assert len(asked.hidden_states) == layers + 1 and len(asked.attentions) == len(asked.cross_attentions) == layers
    torch.testing.assert_close(asked.hidden_states[0], embeddings)
    if base:
        torch.testing.assert_close(asked.hidden_states[-1], asked.last_hidden_state)
    for ours, theirs in zip(from_config.hidden_states + from_config.attentions,
                            asked.hidden_states + asked.attentions):
        torch.testing.assert_close(ours, theirs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(asked.to_tuple())
    torch.testing.assert_close(as_tuple[0], asked.to_tuple()[0])


# -- RoPE -------------------------------------------------------------------------------------------------------


def rotary_of(**rope):
    model = VambaForConditionalGeneration(tiny_config(max_position_embeddings=16, **rope))
    return model.rotary


def test_linear_rope_scaling_divides_the_positions_by_its_factor():
    positions = torch.arange(40)[None]
    cos, sin = rotary_of(rope_scaling={"rope_type": "linear", "factor": 4.0})(positions)
    reference_cos, reference_sin = rotary_of()(positions.float() / 4.0)
    torch.testing.assert_close(cos, reference_cos)
    torch.testing.assert_close(sin, reference_sin)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_dynamic_rope_scaling_changes_only_positions_beyond_the_trained_length(key):
    plain, dynamic = rotary_of(), rotary_of(**{key: {"rope_type": "dynamic", "factor": 4.0}})
    short, long = torch.arange(10)[None], torch.arange(40)[None]
    torch.testing.assert_close(dynamic(short), plain(short))
    assert not torch.allclose(dynamic(long)[0], plain(long)[0])
    torch.testing.assert_close(dynamic(short), plain(short))  # back to the trained frequencies


def test_yarn_rope_scaling_scales_the_rotation_by_its_attention_factor():
    positions = torch.arange(40)[None]
    cos, sin = rotary_of(rope_parameters={"rope_type": "yarn", "factor": 4.0})(positions)
    assert not torch.allclose(cos, rotary_of()(positions)[0])
    attention_factor = 0.1 * torch.log(torch.tensor(4.0)).item() + 1  # YaRN's mscale for factor 4
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.full_like(cos, attention_factor**2))


def test_rope_settings_survive_save_and_load(tmp_path):
    model = VambaForConditionalGeneration(tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    model.save_pretrained(tmp_path)
    loaded = VambaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.rope_parameters == {"rope_type": "linear", "factor": 2.0}
    positions = torch.arange(12)[None]
    torch.testing.assert_close(loaded.rotary(positions), model.rotary(positions))


def test_the_official_mrope_spelling_is_unscaled():
    config = tiny_config(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    assert config.rope_parameters == {"rope_type": "default"}


def test_a_rope_type_qwen2_vl_does_not_take_is_refused():
    with pytest.raises(VambaConfigError, match="rope_type='proportional' is invalid: set it to one of default"):
        tiny_config(rope_scaling={"rope_type": "proportional", "factor": 2.0})


def test_rope_parameters_set_after_the_config_are_read_by_the_model():
    """transformers' common RoPE tests set `config.rope_parameters` on a built config, then build the model."""
    config = tiny_config(max_position_embeddings=16)
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0}
    positions = torch.arange(20)[None]
    cos, _ = VambaForConditionalGeneration(config).rotary(positions)
    reference, _ = rotary_of(rope_theta=10_000.0)(positions.float() / 4.0)
    torch.testing.assert_close(cos, reference)
