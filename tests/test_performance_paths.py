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


# -- the Mamba-2 op tables -------------------------------------------------------------------------------------------

# The kernels' signatures (mamba-ssm 2.2's `mamba_chunk_scan_combined` and gated `rmsnorm_fn`, causal-conv1d's
# `causal_conv1d_fn`): the PyTorch ops take the same arguments, so that one call site serves both tables.
KERNEL_SIGNATURES = {
    "chunk_scan": [("x",), ("dt",), ("A",), ("B",), ("C",), ("chunk_size",), ("D", None), ("z", None),
                   ("dt_bias", None), ("initial_states", None), ("seq_idx", None), ("cu_seqlens", None),
                   ("dt_softplus", False), ("dt_limit", (0.0, float("inf"))), ("return_final_states", False),
                   ("return_varlen_states", False)],
    "causal_conv1d": [("x",), ("weight",), ("bias", None), ("seq_idx", None), ("initial_states", None),
                      ("return_final_states", False), ("final_states_out", None), ("activation", None)],
    "gated_rmsnorm": [("x",), ("weight",), ("bias",), ("z", None), ("eps", 1e-6), ("group_size", None),
                      ("norm_before_gate", True)],
}


@pytest.mark.parametrize("op", sorted(KERNEL_SIGNATURES))
def test_torch_ops_have_the_kernels_signatures(op):
    import inspect

    from vamba_hf.mamba2_vamba import TORCH_OPS

    parameters = inspect.signature(getattr(TORCH_OPS, op)).parameters.values()
    ours = [(p.name,) if p.default is inspect.Parameter.empty else (p.name, p.default) for p in parameters]
    assert ours == KERNEL_SIGNATURES[op]


def test_the_op_table_is_chosen_once_per_call(monkeypatch):
    from vamba_hf.mamba2_vamba import Mamba2

    mixer = tiny_model(mamba_max_tokens=16).model.layers[0].vision_mixer
    calls = []
    original = Mamba2.ops
    monkeypatch.setattr(Mamba2, "ops", lambda self, device: calls.append(device) or original(self, device))
    with torch.no_grad():
        mixer(torch.randn(1, 50, 64))  # four segments
        mixer(torch.randn(1, 50, 64), in_place=True)
    assert len(calls) == 2


def test_stable_segment_sum_keeps_small_sums_exact():
    """Along a chunk the cumulative sum of dt*A reaches thousands; a segment sum taken as a difference of two such
    sums keeps only their last few bits. Summed directly, each one-step segment is its own term exactly."""
    from vamba_hf.mamba2_vamba import segment_sum

    x = -torch.rand(2, 256, generator=torch.Generator().manual_seed(0)) * 20
    sums = segment_sum(x)
    assert torch.equal(sums.diagonal(-1, -2, -1), x[:, 1:])
    assert torch.all(sums.diagonal(0, -2, -1) == 0) and torch.isneginf(sums.triu(1)[..., 0, 1:]).all()
    exact = x.double().cumsum(-1)[..., :, None] - x.double().cumsum(-1)[..., None, :]
    lower = torch.ones(256, 256, dtype=torch.bool).tril()
    assert (sums.double() - exact)[:, lower].abs().max() < 1e-3
    naive = x.cumsum(-1)[..., :, None] - x.cumsum(-1)[..., None, :]
    assert not torch.equal(naive.diagonal(-1, -2, -1), x[:, 1:])  # what the stable form avoids


# -- the compile wrapper ------------------------------------------------------------------------------------------


def failing_compile(error):
    def compile(fn, **kwargs):
        def compiled(*args):
            raise error

        return compiled

    return compile


def backend_failure(inner):
    from torch._dynamo.exc import BackendCompilerFailed

    return BackendCompilerFailed(lambda *a: None, inner, None)


@pytest.mark.parametrize("error, falls_back", [
    (lambda: backend_failure(RuntimeError("Triton is not installed")), True),
    (lambda: torch.OutOfMemoryError("CUDA out of memory"), False),
    (lambda: backend_failure(torch.OutOfMemoryError("CUDA out of memory while autotuning")), False),
    (lambda: ValueError("a bad input"), False),
])
def test_fused_pass_falls_back_only_when_compiling_is_unavailable(monkeypatch, error, falls_back):
    from vamba_hf.layers_vamba import FusedOnCuda

    raised = error()
    monkeypatch.setattr(torch, "compile", failing_compile(raised))
    fused = FusedOnCuda(lambda x: x * 2, device_type="cpu")  # as on CUDA, for tensors on the CPU
    x = torch.ones(3)
    if falls_back:
        assert torch.equal(fused(x), x * 2) and fused.failed
        assert torch.equal(fused(x), x * 2)  # eager from now on
    else:
        with pytest.raises(type(raised)):
            fused(x)
        assert not fused.failed


def test_fused_pass_runs_eager_where_torch_compile_cannot_start(monkeypatch):
    from vamba_hf.layers_vamba import FusedOnCuda

    def no_compile(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compile)
    fused = FusedOnCuda(lambda x: x + 1, device_type="cpu")
    assert torch.equal(fused(torch.zeros(2)), torch.ones(2)) and fused.failed


def test_fused_pass_runs_eager_for_a_module_with_quantized_weights(monkeypatch):
    """A module whose weights are a quantization library's tensor type is not traced (torchao's int8 weights made
    the 7B tower's compiled regions compile anew per block, for minutes, on an H100): the eager call runs instead."""
    from vamba_hf.layers_vamba import FusedOnCuda

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)

    class QuantizedWeight(torch.Tensor):  # stands for torchao's and bitsandbytes' weight types
        pass

    linear = torch.nn.Linear(2, 2)
    fused = FusedOnCuda(lambda x, module: module(x), device_type="cpu")
    x = torch.ones(1, 2)
    with torch.no_grad():
        assert fused.compiles(x, linear) and torch.equal(fused(x, linear), linear(x)) and len(compiled) == 1
        linear.weight = torch.nn.Parameter(linear.weight.detach().as_subclass(QuantizedWeight))
        assert type(linear.weight) is QuantizedWeight
        assert not fused.compiles(x, linear)
        assert torch.equal(fused(x, linear), linear(x)) and len(compiled) == 1


def test_two_models_keep_their_own_compile_state(monkeypatch, caplog):
    """Compile state is each model's, shared by all its fused passes: a model that finds torch.compile unavailable
    warns once and runs eager from then on, while another model in the process still compiles its own passes."""
    from helpers import prompt, video_pixels

    from vamba_hf.layers_vamba import FusedOnCuda

    first, second = tiny_model(), tiny_model()
    passes = {}
    for model in (first, second):
        passes[model] = [value for module in model.modules() for value in vars(module).values()
                         if isinstance(value, FusedOnCuda)]
        for fused in passes[model]:
            monkeypatch.setattr(fused, "device_type", "cpu")  # as on CUDA, for tensors on the CPU
    pixels, grid = video_pixels(4, 4, 6)
    inputs = dict(input_ids=prompt(2, 5)[None], pixel_values_videos=pixels, video_grid_thw=grid)
    monkeypatch.setattr(torch, "compile", failing_compile(backend_failure(RuntimeError("Triton is not installed"))))
    with torch.no_grad(), caplog.at_level("WARNING"):
        expected = first(**inputs).logits
    assert caplog.text.count("torch.compile is unavailable") == 1
    assert all(fused.failed for fused in passes[first]) and not any(fused.failed for fused in passes[second])

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    with torch.no_grad():
        assert torch.equal(second(**inputs).logits, expected)
        # one compiled function per function (and dynamic setting) of the model
        assert len(compiled) == len({(fused.fn, fused.dynamic) for fused in passes[second]})
        compiled.clear()
        assert torch.equal(first(**inputs).logits, expected)
    assert compiled == []


def test_a_copied_model_has_its_own_compile_state():
    import copy
    import pickle

    from vamba_hf.layers_vamba import FusedOnCuda

    def states(model):
        return {id(value.state) for module in model.modules() for value in vars(module).values()
                if isinstance(value, FusedOnCuda)}

    model = tiny_model()
    model.model.norm.fused_norm.state.compiled["a compiled function"] = lambda x: x  # as after a CUDA call
    model.model.norm.fused_norm.state.failed = True
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert len(states(copied)) == 1 and states(copied).isdisjoint(states(model))
        assert copied.model.norm.fused_norm.state.compiled == {} and copied.model.norm.fused_norm.failed
