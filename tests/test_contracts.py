"""Vamba behaves as transformers' contracts define for a VLM: the forward's keywords (and a TypeError for any other),
attention outputs, tuples for return_dict=False, pre-shifted labels, prompts checked at prefill only, and assisted /
prompt-lookup decoding equal to greedy."""

import inspect

import pytest
import torch
from helpers import EOS, VISION_START, prompt, relative_error, tiny_model, video_pixels
from transformers import LogitsProcessor, LogitsProcessorList

from vamba_hf import VambaForConditionalGeneration, VambaModel
from vamba_hf.modeling_vamba import CACHE_NAME

CONTRACT_KEYWORDS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "inputs_embeds",
                     "labels", "shift_labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
                     "video_grid_thw", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
                     "logits_to_keep", "num_items_in_batch")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def video():
    pixels, grid = video_pixels(2, 4, 6)
    return dict(pixel_values_videos=pixels, video_grid_thw=grid)


# -- keywords -------------------------------------------------------------------------------------------------------


def test_forward_declares_every_keyword_of_the_contract():
    parameters = inspect.signature(VambaForConditionalGeneration.forward).parameters
    missing = [name for name in CONTRACT_KEYWORDS if name not in parameters]
    assert not missing
    # The Trainer passes `num_items_in_batch` only to a forward that takes loss keywords.
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_forward_takes_what_generate_and_the_trainer_pass(model, video):
    ids = prompt(1, 3)[None]
    labels = ids.clone()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(ids.shape[1])[None],
                    labels=labels, use_cache=True, output_attentions=False, output_hidden_states=True,
                    return_dict=True, cache_position=torch.arange(ids.shape[1]), logits_to_keep=0,
                    num_items_in_batch=torch.tensor(3), **{CACHE_NAME: None}, **video)
    assert out.loss is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("model_class", [VambaForConditionalGeneration, VambaModel])
def test_forward_rejects_an_unknown_keyword(model, video, model_class):
    forward = model if model_class is VambaForConditionalGeneration else VambaModel(model.config).eval()
    with pytest.raises(TypeError, match=r"\['pixel_value'\]"):
        forward(input_ids=prompt(1, 3)[None], pixel_value=video["pixel_values_videos"])
    with pytest.raises(TypeError, match=r"\['cu_seq_lens_q', 'max_length_q'\]"):
        forward(input_ids=prompt(1, 3)[None], cu_seq_lens_q=torch.tensor([0, 6]), max_length_q=6, **video)


# -- return_dict and labels -----------------------------------------------------------------------------------------


def test_return_dict_false_returns_the_same_values_as_a_tuple(model, video):
    ids = prompt(2, 3)[None]
    with torch.no_grad():
        as_dict = model(input_ids=ids, labels=ids, output_hidden_states=True, **video)
        as_tuple = model(input_ids=ids, labels=ids, output_hidden_states=True, return_dict=False, **video)
        base = VambaModel(model.config).eval()
        base.load_state_dict(model.state_dict(), strict=False)
        base_tuple = base(input_ids=ids, return_dict=False, **video)
    assert isinstance(as_tuple, tuple) and isinstance(base_tuple, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for ours, reference in zip(as_tuple, expected):
        if isinstance(reference, torch.Tensor):
            assert torch.equal(ours, reference)
        elif isinstance(reference, tuple):
            assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert base_tuple[0].shape == (1, ids.shape[1], model.config.hidden_size)


def test_shift_labels_are_taken_as_already_shifted(model, video):
    ids = prompt(2, 5)[None]
    labels = ids.clone()
    labels[:, :3] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        from_labels = model(input_ids=ids, labels=labels, **video).loss
        from_shifted = model(input_ids=ids, shift_labels=shifted, **video).loss
        unshifted = model(input_ids=ids, shift_labels=labels, **video).loss
        # The Trainer passes both under context parallelism: transformers' loss then reads `shift_labels`.
        both = model(input_ids=ids, labels=labels, shift_labels=labels, **video).loss
    assert torch.equal(from_shifted, from_labels)
    assert not torch.allclose(unshifted, from_labels)
    assert torch.equal(both, unshifted)


# -- attention outputs ----------------------------------------------------------------------------------------------


def check_attentions(attentions, batch, heads, queries, keys, causal):
    for weights in attentions:
        assert weights.shape == (batch, heads, queries, keys)
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, heads, queries))
        if causal:
            assert torch.all(weights.triu(keys - queries + 1) == 0)


def test_attentions_and_cross_attentions_per_layer(model, video):
    ids = prompt(2, 4)[None]
    config = model.config
    tokens = int(video["video_grid_thw"].prod()) // 4
    with torch.no_grad():
        plain = model(input_ids=ids, **video)
        out = model(input_ids=ids, output_attentions=True, **video)
        text_only = model(input_ids=prompt(5, 0, visual=False)[None], output_attentions=True)
    assert len(out.attentions) == len(out.cross_attentions) == config.num_hidden_layers
    check_attentions(out.attentions, 1, config.num_attention_heads, ids.shape[1], ids.shape[1], causal=True)
    check_attentions(out.cross_attentions, 1, config.num_attention_heads, ids.shape[1], tokens, causal=False)
    assert relative_error(out.logits, plain.logits) <= 1e-5  # eager weights, the same function
    assert text_only.cross_attentions == (None,) * config.num_hidden_layers


def test_generate_returns_the_attentions_of_every_step(model, video):
    ids = prompt(2, 4)[None]
    config = model.config
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             output_attentions=True, return_dict_in_generate=True, **video)
        greedy = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, eos_token_id=None, **video)
    assert torch.equal(out.sequences, greedy)
    assert len(out.attentions) == 3
    for step, layers in enumerate(out.attentions):
        queries = ids.shape[1] if step == 0 else 1
        check_attentions(layers, 1, config.num_attention_heads, queries, ids.shape[1] + step, causal=True)


# -- prompts are checked at prefill ---------------------------------------------------------------------------------


class ForceTokenAt(LogitsProcessor):
    def __init__(self, token: int, step: int):
        self.token, self.step, self.calls = token, step, 0

    def __call__(self, input_ids, scores):
        if self.calls == self.step:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token] = 0.0
        self.calls += 1
        return scores


@pytest.mark.parametrize("static_step", [False, True])
def test_generated_vision_start_token_is_just_a_token(model, video, monkeypatch, static_step):
    """A model that emits <|vision_start|> while decoding must go on decoding: the prompt was checked at prefill.
    The eager cache and the static (CUDA-graph) step behave the same."""
    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", static_step)
    ids = prompt(2, 4)[None]
    results = []
    for visual in (video, {}):
        inputs = ids if visual else prompt(4, 0, visual=False)[None]
        with torch.no_grad():
            out = model.generate(input_ids=inputs, max_new_tokens=4, do_sample=False, eos_token_id=None,
                                 logits_processor=LogitsProcessorList([ForceTokenAt(VISION_START, 1)]),
                                 output_scores=True, return_dict_in_generate=True, **visual)
        assert out.sequences[0, inputs.shape[1] + 1] == VISION_START
        results.append(out)
    if static_step:
        monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", False)
        with torch.no_grad():
            eager = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None,
                                   logits_processor=LogitsProcessorList([ForceTokenAt(VISION_START, 1)]),
                                   output_scores=True, return_dict_in_generate=True, **video)
        assert torch.equal(eager.sequences, results[0].sequences)
        assert relative_error(torch.stack(eager.scores[2:]), torch.stack(results[0].scores[2:])) <= 1e-5


def test_a_prompt_placeholder_without_its_video_is_still_refused(model):
    with pytest.raises(ValueError, match="1 <\\|vision_start\\|> placeholder\\(s\\) but 0"):
        model(input_ids=prompt(1, 2)[None])
    with pytest.raises(ValueError, match="1 <\\|vision_start\\|> placeholder\\(s\\) but 0"):
        model.generate(input_ids=prompt(1, 2)[None], max_new_tokens=2)


# -- assisted and prompt-lookup decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["assistant", "same_model_assistant", "prompt_lookup", "assistant_attentions"])
def test_assisted_and_prompt_lookup_decoding_equal_greedy_with_a_video(model, video, mode):
    ids = prompt(2, 4)[None]
    # transformers 4.57's prompt lookup needs an eos id; the tiny model never emits this one.
    common = dict(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=EOS, **video)
    options = {
        "assistant": dict(assistant_model=tiny_model(num_hidden_layers=1)),
        "same_model_assistant": dict(assistant_model=model),
        "prompt_lookup": dict(prompt_lookup_num_tokens=2),
        "assistant_attentions": dict(assistant_model=tiny_model(num_hidden_layers=1), output_attentions=True,
                                     return_dict_in_generate=True),
    }[mode]
    with torch.no_grad():
        greedy = model.generate(**common)
        out = model.generate(**common, **options)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert torch.equal(sequences, greedy)
    if mode == "assistant_attentions":
        assert len(out.attentions) == sequences.shape[1] - ids.shape[1]
        assert all(len(step) == model.config.num_hidden_layers for step in out.attentions)


# -- generation entry points ----------------------------------------------------------------------------------------


def test_generate_from_inputs_embeds_equals_generate_from_ids(model):
    ids = prompt(4, 0, visual=False)[None]
    embeds = model.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False, eos_token_id=None)
        from_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_generate_continues_from_a_returned_cache(model, video):
    ids = prompt(2, 3)[None]
    greedy = dict(do_sample=False, eos_token_id=None)
    with torch.no_grad():
        whole = model.generate(input_ids=ids, max_new_tokens=6, **greedy, **video)
        first = model.generate(input_ids=ids, max_new_tokens=3, return_dict_in_generate=True, **greedy, **video)
        continued = model.generate(input_ids=first.sequences, max_new_tokens=3, **greedy, **video,
                                   **{CACHE_NAME: getattr(first, CACHE_NAME)})
    assert torch.equal(continued, whole)


def test_a_cache_implementation_vamba_does_not_keep_is_refused(model, video):
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported"):
        model.generate(input_ids=prompt(1, 2)[None], max_new_tokens=2, cache_implementation="offloaded", **video)


def test_a_cache_of_another_kind_is_refused(model, video):
    from transformers.cache_utils import DynamicCache

    class OtherCache(DynamicCache):
        pass

    with pytest.raises(ValueError, match="must be a VambaCache .* got OtherCache"):
        model(input_ids=prompt(1, 2)[None], use_cache=True, **{CACHE_NAME: OtherCache()}, **video)
