"""CPU checks of the performance paths: GQA folded cross-attention, the in-place segmented Mamba-2 update, and the
8-bit cross-attention K/V cache. (The CUDA kernels themselves are checked by benchmarks/bench_vamba.py.)"""

import pytest
import torch

from helpers import VISION_END, VISION_START, relative_error, tiny_model

from vamba_hf import VambaConfig
from vamba_hf.cache_vamba import VambaCache, quantize_per_token
from vamba_hf.layers_vamba import attention_mask_for


def video_prompt(length=6):
    return torch.tensor([[5, VISION_START, VISION_END] + list(range(10, 10 + length))])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("queries", [1, 5])
def test_folded_cross_attention_equals_repeated_heads(padded, queries):
    attention = tiny_model().model.layers[0].cross_attn
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = torch.randn(2, heads, queries, dim)
    k, v = torch.randn(2, kv_heads, 40, dim), torch.randn(2, kv_heads, 40, dim)
    keep = torch.ones(2, 40, dtype=torch.bool)
    if padded:
        keep[1, 25:] = False
    mask_sdpa = attention_mask_for(keep[:, None, :], "sdpa", q.dtype) if padded else None
    mask_eager = attention_mask_for(keep[:, None, :], "eager", q.dtype) if padded else None
    with torch.no_grad():
        folded, _ = attention.attend(q, k, v, mask_sdpa, "sdpa")  # one SDPA call on the 2 stored K/V heads
        repeated, _ = attention.attend(q, k, v, mask_eager, "eager")  # K/V repeated to 4 heads
    assert relative_error(folded, repeated) <= 1e-6


def test_in_place_segmented_mixer_equals_out_of_place():
    mixer = tiny_model(mamba_max_tokens=16).model.layers[0].vision_mixer
    visual = torch.randn(2, 50, 64)
    with torch.no_grad():
        expected = mixer(visual)
        work = visual.clone()
        updated = mixer(work, in_place=True)
    assert updated.data_ptr() == work.data_ptr()
    assert relative_error(updated, expected) <= 1e-6


def test_inference_does_not_touch_given_visual_embeds():
    model = tiny_model()
    embeds = torch.randn(40, 64)
    before = embeds.clone()
    with torch.no_grad():
        model(input_ids=video_prompt(), visual_embeds=[embeds])
    assert torch.equal(embeds, before)


def test_float8_quantization_error_is_small():
    x = torch.randn(1, 2, 300, 16) * torch.linspace(0.1, 4, 300)[:, None]
    x[0, 0, 7] *= 1e4  # an outlier token costs the others nothing
    stored, scale = quantize_per_token(x, torch.float8_e4m3fn)
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (1, 2, 300, 1)
    assert relative_error(stored.to(x.dtype) * scale, x) <= 0.04  # e4m3 keeps 3 mantissa bits


def test_float8_cross_kv_cache_decodes_close_to_full_precision():
    model = tiny_model()
    prompt, embeds = video_prompt(), [torch.randn(120, 64)]
    scores = {}
    for storage in (None, "float8_e4m3fn"):
        model.config.cross_kv_cache_dtype = storage
        with torch.no_grad():
            out = model.generate(input_ids=prompt, visual_embeds=embeds, max_new_tokens=6, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        cache = out.past_key_values
        assert isinstance(cache, VambaCache)
        key, value = cache.cross.kv[0]
        assert key.dtype == value.dtype == (torch.float8_e4m3fn if storage else torch.float32)
        assert cache.cross.read(0)[0].dtype == torch.float32
        scores[storage] = torch.stack(out.scores, 1)
    # The first step reads the prefill's own K/V; later steps read the 8-bit cache.
    assert relative_error(scores["float8_e4m3fn"], scores[None]) <= 3e-2


def test_cross_kv_cache_dtype_is_validated():
    assert VambaConfig(cross_kv_cache_dtype="float8_e4m3fn").cross_kv_cache_dtype == "float8_e4m3fn"
    with pytest.raises(ValueError, match="cross_kv_cache_dtype"):
        VambaConfig(cross_kv_cache_dtype="int4")
