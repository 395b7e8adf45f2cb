"""The model's input boundary: each malformed input gives our ValueError/TypeError naming the field and the fix,
in forward and in generate; non-finite pixels are refused; non-finite logits at prefill name their likely causes;
and a fuzz of model inputs ends only in success or our own errors."""

import pytest
import torch
from helpers import prompt, tiny_model, video_pixels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def good_inputs():
    pixels, grid = video_pixels(2, 4, 4)
    ids = prompt(1, 2)[None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels, video_grid_thw=grid)


def with_nan(pixels):
    pixels = pixels.clone()
    pixels[3, 7] = float("nan")
    return pixels


BAD_INPUTS = {
    # name: (change to the good inputs, error type, what the message must say)
    "odd grid width": (lambda x: dict(video_grid_thw=torch.tensor([[2, 4, 3]]), pixel_values_videos=x[
        "pixel_values_videos"][:24]), ValueError, "`video_grid_thw`.*multiples of spatial_merge_size=2"),
    "negative grid": (lambda x: dict(video_grid_thw=torch.tensor([[2, -4, 4]])), ValueError,
                      "`video_grid_thw`.*at least 1"),
    "float grid": (lambda x: dict(video_grid_thw=x["video_grid_thw"].float()), ValueError,
                   "`video_grid_thw` must hold integers"),
    "flat grid with the right product": (lambda x: dict(video_grid_thw=x["video_grid_thw"][0]), ValueError,
                                         "`video_grid_thw` has shape \\(3,\\) but must be \\(items, 3\\)"),
    "grid of four columns": (lambda x: dict(video_grid_thw=torch.tensor([[2, 4, 4, 1]])), ValueError,
                             "`video_grid_thw` has shape \\(1, 4\\)"),
    "grid for more patches": (lambda x: dict(video_grid_thw=torch.tensor([[4, 4, 4]])), ValueError,
                              "`video_grid_thw` describes 64 patches but the video pixels hold 32"),
    "pixel rows of the wrong width": (lambda x: dict(pixel_values_videos=x["pixel_values_videos"][:, :1000]),
                                      ValueError, "`pixel_values_videos` is torch.float32 of shape \\(32, 1000\\)"),
    "integer pixels": (lambda x: dict(pixel_values_videos=x["pixel_values_videos"].long()), ValueError,
                       "`pixel_values_videos` is torch.int64"),
    "a NaN pixel": (lambda x: dict(pixel_values_videos=with_nan(x["pixel_values_videos"])), ValueError,
                    "`pixel_values_videos` holds NaN or infinite values"),
    "an infinite pixel": (lambda x: dict(pixel_values_videos=x["pixel_values_videos"].index_fill(0, torch.tensor(
        [5]), float("inf"))), ValueError, "`pixel_values_videos` holds NaN or infinite values"),
    "pixels without grid": (lambda x: dict(video_grid_thw=None), ValueError, "without `video_grid_thw`"),
    "out-of-vocabulary id": (lambda x: dict(input_ids=x["input_ids"].index_fill(1, torch.tensor([0]), 320)),
                             ValueError, "`input_ids` holds id 320, outside the vocabulary \\(0..319\\)"),
    "negative id": (lambda x: dict(input_ids=x["input_ids"].index_fill(1, torch.tensor([0]), -1)), ValueError,
                    "`input_ids` holds id -1"),
    "float ids": (lambda x: dict(input_ids=x["input_ids"].float()), ValueError,
                  "`input_ids` must hold integers \\(torch.long\\), got torch.float32"),
    "bool ids": (lambda x: dict(input_ids=x["input_ids"] > 5), ValueError, "`input_ids` must hold integers"),
    "ids as a list": (lambda x: dict(input_ids=x["input_ids"].tolist()), TypeError,
                      "`input_ids` must be a torch.Tensor, got list"),
    "empty ids": (lambda x: dict(input_ids=torch.zeros(1, 0, dtype=torch.long), attention_mask=None,
                                 pixel_values_videos=None, video_grid_thw=None), ValueError, "`input_ids` is empty"),
    "ids without batch dimension": (lambda x: dict(input_ids=x["input_ids"][0]), ValueError,
                                    "`input_ids` must be \\(batch, length\\).*input_ids\\[None\\]"),
    "short attention mask": (lambda x: dict(attention_mask=x["attention_mask"][:, 1:]), ValueError,
                             "`attention_mask` covers 4 positions but the cache holds 0 and the input 5"),
    "long attention mask": (lambda x: dict(attention_mask=torch.ones(1, 8, dtype=torch.long)), ValueError,
                            "`attention_mask` covers 8 positions"),
    "attention mask of another batch": (lambda x: dict(attention_mask=torch.ones(3, 5, dtype=torch.long)),
                                        ValueError, "`attention_mask` has shape \\(3, 5\\) but the input has batch"),
    "attention mask of twos": (lambda x: dict(attention_mask=x["attention_mask"] * 2), ValueError,
                               "`attention_mask` holds values other than 0 and 1"),
    "visual_embeds as a tensor": (lambda x: dict(pixel_values_videos=None, video_grid_thw=None,
                                                 visual_embeds=torch.randn(8, 64)), TypeError,
                                  "`visual_embeds` must be a list of tensors"),
    "visual_embeds of the wrong width": (lambda x: dict(pixel_values_videos=None, video_grid_thw=None,
                                                        visual_embeds=[torch.randn(8, 32)]), ValueError,
                                         "`visual_embeds\\[0\\]` is torch.float32 of shape \\(8, 32\\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_bad_model_input_names_the_field(model, case, entry):
    change, error, message = BAD_INPUTS[case]
    inputs = good_inputs()
    inputs.update(change(inputs))
    inputs = {k: v for k, v in inputs.items() if v is not None}
    with torch.no_grad(), pytest.raises(error, match=message):
        if entry == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("field, value, message", [
    ("labels", torch.zeros(1, 4, dtype=torch.long), "`labels` has shape \\(1, 4\\) but the input is \\(1, 5\\)"),
    ("labels", torch.zeros(1, 5), "`labels` must hold integers"),
    ("shift_labels", torch.zeros(2, 5, dtype=torch.long), "`shift_labels` has shape \\(2, 5\\)"),
    ("position_ids", torch.arange(4)[None], "`position_ids` has shape \\(1, 4\\)"),
    ("position_ids", torch.arange(5.0)[None], "`position_ids` must hold integers"),
    ("inputs_embeds", torch.randn(1, 5, 32), "`inputs_embeds` is torch.float32 of shape \\(1, 5, 32\\)"),
])
def test_bad_targets_positions_and_embeddings_name_the_field(model, field, value, message):
    inputs = good_inputs()
    if field == "inputs_embeds":
        inputs = dict(inputs_embeds=value)
    else:
        inputs[field] = value
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(**inputs)


def test_non_finite_logits_at_prefill_name_the_likely_causes():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")  # as a corrupted checkpoint would hold
        for call in (lambda: model(**good_inputs()),
                     lambda: model.generate(**good_inputs(), max_new_tokens=3, do_sample=False)):
            with pytest.raises(ValueError, match="logits for the prompt are NaN or infinite.*non-finite weights.*"
                                                 "float16 overflow"):
                call()


def test_training_forwards_leave_non_finite_losses_to_the_trainer():
    model = tiny_model().train()
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
    inputs = good_inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isnan(out.loss)


# -- fuzz ------------------------------------------------------------------------------------------------------------


def tensor_of(draw, shape, dtype):
    if dtype.is_floating_point:
        values = st.sampled_from([0.0, 1.0, -2.5, 1e4, float("nan"), float("inf")])
        flat = draw(st.lists(values, min_size=1, max_size=4))
        numel = 1
        for n in shape:
            numel *= n
        return torch.tensor((flat * (numel // len(flat) + 1))[:numel], dtype=dtype).reshape(shape)
    low, high = draw(st.sampled_from([(0, 300), (-3, 3), (300, 330), (0, 2)]))
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(dtype)


@st.composite
def model_inputs(draw):
    batch = draw(st.integers(1, 2))
    length = draw(st.integers(0, 6))
    ids_shape = draw(st.sampled_from([(batch, length), (length,), (batch, length, 1)]))
    ids_dtype = draw(st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]))
    inputs = {"input_ids": tensor_of(draw, ids_shape, ids_dtype)}
    if draw(st.booleans()):
        inputs["input_ids"][..., :1] = 300  # <|vision_start|>
    if draw(st.booleans()):
        grid_rows = draw(st.lists(st.lists(st.integers(-1, 4), min_size=2, max_size=4), min_size=1, max_size=2))
        inputs["video_grid_thw"] = torch.tensor(grid_rows) if len({len(r) for r in grid_rows}) == 1 else torch.tensor(
            grid_rows[0])
        if draw(st.booleans()):
            inputs["video_grid_thw"] = inputs["video_grid_thw"].float()
        rows = draw(st.sampled_from([0, 8, 16, 32]))
        width = draw(st.sampled_from([1176, 1175]))
        inputs["pixel_values_videos"] = tensor_of(draw, (rows, width), draw(st.sampled_from([torch.float32,
                                                                                              torch.long])))
    if draw(st.booleans()):
        mask_shape = draw(st.sampled_from([(batch, length), (batch, length + 1), (batch + 1, length), (length,)]))
        inputs["attention_mask"] = tensor_of(draw, mask_shape, torch.long)
    return inputs


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=model_inputs())
def test_fuzzed_model_inputs_end_in_success_or_our_error(inputs):
    model = FUZZ_MODEL
    try:
        with torch.no_grad():
            out = model(**inputs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert len(message) > 20 and "\n" not in message, message
        assert "`" in message or "<|vision_start|>" in message or "exactly one of" in message, message
    else:
        assert torch.isfinite(out.logits).all()


FUZZ_MODEL = tiny_model()


def test_non_finite_logits_are_caught_when_the_prefill_fills_a_given_cache():
    from vamba_hf.cache_vamba import VambaCache

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[3, 5] = float("nan")
        with pytest.raises(ValueError, match="logits for the prompt are NaN"):
            model(**good_inputs(), past_key_values=VambaCache(), use_cache=True)
