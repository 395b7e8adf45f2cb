"""The static decoding step that DecodeGraph captures on CUDA, run eagerly on CPU: same tokens and logits as the
plain cache, through greedy, batched/padded and beam-search generation, and back to the plain cache after."""

import pytest
import torch
from helpers import left_pad, prompt, relative_error, tiny_model, video_pixels

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.cache_vamba import DecodeGraph


@pytest.fixture
def static_steps_on_cpu(monkeypatch):
    steps = []
    original = DecodeGraph.step
    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", True)
    monkeypatch.setattr(DecodeGraph, "step", lambda self, *a: steps.append(1) or original(self, *a))
    return steps


def generate_both_ways(model, **kwargs):
    results = []
    for with_graph in (False, True):
        model.config.decode_with_cuda_graph = with_graph
        with torch.no_grad():
            results.append(model.generate(**kwargs, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                                          output_scores=True))
    return results


@pytest.mark.parametrize("options", [dict(), dict(cross_attn_use_position_embeddings=True)])
def test_static_step_equals_plain_cache_greedy(static_steps_on_cpu, options):
    model = tiny_model(**options)
    pixels, grid = video_pixels(4, 4, 6)
    plain, static = generate_both_ways(model, input_ids=prompt(2, 5)[None], pixel_values_videos=pixels,
                                       video_grid_thw=grid, max_new_tokens=7)
    assert len(static_steps_on_cpu) == 6  # every step after the prompt
    assert torch.equal(plain.sequences, static.sequences)
    assert relative_error(torch.stack(static.scores), torch.stack(plain.scores)) <= 1e-5


def test_static_step_batched_with_padding_and_text_only_rows(static_steps_on_cpu):
    model = tiny_model()
    rows = [prompt(2, 6, seed=1), prompt(4, 1, seed=2, visual=False), prompt(0, 3, seed=3)]
    ids, mask = left_pad(rows)
    videos = [video_pixels(4, 4, 6, seed=1), video_pixels(2, 6, 4, seed=2)]
    plain, static = generate_both_ways(model, input_ids=ids, attention_mask=mask,
                                       pixel_values_videos=torch.cat([v[0] for v in videos]),
                                       video_grid_thw=torch.cat([v[1] for v in videos]), max_new_tokens=5)
    assert static_steps_on_cpu and torch.equal(plain.sequences, static.sequences)
    assert relative_error(torch.stack(static.scores), torch.stack(plain.scores)) <= 1e-5


def test_static_step_follows_beam_reordering(static_steps_on_cpu):
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    plain, static = generate_both_ways(model, input_ids=prompt(1, 3)[None], pixel_values_videos=pixels,
                                       video_grid_thw=grid, max_new_tokens=6, num_beams=3, num_return_sequences=3)
    assert static_steps_on_cpu and torch.equal(plain.sequences, static.sequences)


def test_cache_returns_to_plain_form_for_a_next_prompt(static_steps_on_cpu):
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    ids = prompt(1, 3)[None]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True)
        cache = out.past_key_values
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(3):
            tokens.append(model(input_ids=tokens[-1], past_key_values=cache).logits.argmax(-1))
        assert cache.decode_graph is not None and cache.get_seq_length() == ids.shape[1] + 3
        follow_up = prompt(3, 0, seed=5, visual=False)[None]
        continued = model(input_ids=follow_up, past_key_values=cache).logits
        assert cache.decode_graph is None and cache.get_seq_length() == ids.shape[1] + 3 + follow_up.shape[1]
        everything = torch.cat([ids, *tokens[:-1], follow_up], dim=1)  # the last token was never fed
        whole = model(input_ids=everything, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=False).logits
    assert relative_error(continued, whole[:, -follow_up.shape[1]:]) <= 1e-5


def test_while_a_graph_runs_the_cache_layers_are_its_buffers(static_steps_on_cpu):
    """The static step's K/V buffers are the cache's own layers: each layer's length is the cache's
    (`get_seq_length` has one meaning), and their held positions are the K/V the plain cache holds after the same
    steps."""
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    ids = prompt(1, 3)[None]
    caches = []
    for with_graph in (False, True):
        model.config.decode_with_cuda_graph = with_graph
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                token = model(input_ids=token, past_key_values=cache).logits.argmax(-1)
        caches.append(cache)
    plain, stepped = caches
    assert plain.decode_graph is None and stepped.decode_graph is not None
    length = ids.shape[1] + 3
    assert stepped.get_seq_length() == plain.get_seq_length() == length
    assert [layer.get_seq_length() for layer in stepped.layers] == [length] * len(plain.layers)
    for held, layer in zip(plain.layers, stepped.layers):
        assert relative_error(layer.keys[:, :, :length], held.keys) <= 1e-5
        assert relative_error(layer.values[:, :, :length], held.values) <= 1e-5
    stepped.release_decode_graph()
    for held, layer in zip(plain.layers, stepped.layers):
        assert layer.keys.shape == held.keys.shape and layer.get_seq_length() == length


def test_capacity_grows_past_the_headroom(static_steps_on_cpu, monkeypatch):
    monkeypatch.setattr(DecodeGraph, "headroom", 4)
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    plain, static = generate_both_ways(model, input_ids=prompt(1, 3)[None], pixel_values_videos=pixels,
                                       video_grid_thw=grid, max_new_tokens=12)
    assert torch.equal(plain.sequences, static.sequences)


def test_a_finished_generation_is_freed_without_the_cycle_collector(static_steps_on_cpu):
    import gc
    import weakref

    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    with torch.no_grad():
        out = model.generate(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels, video_grid_thw=grid,
                             max_new_tokens=4, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.decode_graph is not None
    cross_key = weakref.ref(cache.cross.kv[0][0])
    gc.disable()
    try:
        del out, cache
        assert cross_key() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("static", [False, True])
def test_every_forward_runs_the_text_models_one_layer_loop(monkeypatch, static):
    """Prefill, eager decoding and the static step all go through VambaTextModel.forward."""
    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", static)
    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    calls = []
    model.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    with torch.no_grad():
        model.generate(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels, video_grid_thw=grid,
                       max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert calls == [6, 1, 1, 1]


def test_shared_rows_read_their_video_folded_as_each_row_alone():
    """The cross store folds the queries of rows that share a video (row_group) into one attention call: equal to
    each row reading its own gathered copy."""
    from vamba_hf.cache_vamba import CrossStore

    torch.manual_seed(0)
    key, value = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    store = CrossStore()
    store.share({0: (key, value)}, {}, torch.tensor([0, 0, 0, 1, 1, 1]), None, None)
    assert store.row_group == 3 and store.holds(0) and not store.holds(1)
    queries = torch.randn(6, 4, 1, 8)

    def attend(q, k, v, mask):  # as cross-attention's SDPA call: query heads sharing a K/V head folded together
        batch, heads, length, dim = q.shape
        out = torch.nn.functional.scaled_dot_product_attention(q.reshape(batch, k.shape[1], -1, dim), k, v,
                                                               attn_mask=mask)
        return out.reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, -1), None

    folded, _ = store.attend(0, queries, None, attend, fold=True)
    alone, _ = store.attend(0, queries, None, attend, fold=False)
    assert folded.shape == alone.shape == (6, 1, 32)
    torch.testing.assert_close(folded, alone)


def test_bitsandbytes_8bit_layers_decode_without_the_graph(static_steps_on_cpu):
    """bitsandbytes' LLM.int8() layers synchronise with the host inside their matmul, which a CUDA graph's capture
    refuses (seen on an H100): a model holding one decodes eagerly, with the tokens of the plain cache."""

    class Linear8bitLt(torch.nn.Linear):  # bitsandbytes' class name; the matmul itself does not matter here
        pass

    model = tiny_model()
    pixels, grid = video_pixels(2, 4, 4)
    kwargs = dict(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels, video_grid_thw=grid, max_new_tokens=4)
    plain, static = generate_both_ways(model, **kwargs)
    assert static.past_key_values.decode_graph is not None and static_steps_on_cpu
    head = model.lm_head
    model.lm_head = Linear8bitLt(head.in_features, head.out_features, bias=False)
    model.lm_head.weight = head.weight
    model._graph_capture_blocked = None  # read anew: this model's layers changed after its first decoding
    static_steps_on_cpu.clear()
    plain_again, static_again = generate_both_ways(model, **kwargs)
    assert static_again.past_key_values.decode_graph is None and not static_steps_on_cpu
    assert torch.equal(static_again.sequences, plain.sequences)
