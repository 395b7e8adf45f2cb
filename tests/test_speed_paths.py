"""The vision tower's and the decoding step's fast paths (issue 16) equal the plain computations they replace: the
patch embedding as a matrix product, the compiled block regions (traced here as on CUDA, through aot_eager), the
attention layout and flash-attn's variable-length path, several videos in one batch, and a decoding step that does
no work proportional to the visual length besides reading the cross-attention K/V."""

import pytest
import torch
import torch.nn.functional as F
from helpers import left_pad, prompt, relative_error, tiny_model, video_pixels
from torch.overrides import TorchFunctionMode

from vamba_hf import VambaForConditionalGeneration
from vamba_hf import layers_vamba as layers
from vamba_hf import vision_vamba as vision
from vamba_hf.configuration_vamba import VambaVisionConfig


def vision_config(**overrides) -> VambaVisionConfig:
    config = VambaVisionConfig(**{**dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
                                  **overrides})
    config._attn_implementation = "sdpa"
    return config


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """`module` in eval mode with its norms and biases moved off their initial values, so a wrong wiring shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return module.eval()


def tower(max_frames: int = 64, **overrides) -> vision.VambaVisionTower:
    return perturbed(vision.VambaVisionTower(vision_config(**overrides), max_frames))


def frames_and_rotary(config, num_frames=3, height=4, width=6, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    frames = torch.randn(num_frames, height * width, config.embed_dim, generator=generator, dtype=dtype)
    return frames, vision.VambaVisionRotary(config)(height, width, "cpu")


def plain_block(block, frames, rotary):
    """The vision block written out as one chain of its modules' calls, repeat_kv-free eager attention."""
    cos, sin = rotary  # (L, head_dim), against the (F, heads, L, head_dim) queries and keys
    x = block.norm1(frames)
    num_frames, length, dim = x.shape
    q, k, v = block.attn.qkv(x).view(num_frames, length, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = (layers.apply_rotary(t, cos, sin) for t in (q, k))
    weights = torch.softmax(q @ k.transpose(-1, -2) * block.attn.scaling, dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(num_frames, length, dim)
    frames = frames + block.attn.proj(attended)
    return frames + block.mlp(block.norm2(frames))


# -- patch embedding ---------------------------------------------------------------------------------------------


def test_patch_embedding_as_matmul_equals_the_strided_conv3d():
    embed = vision.PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=48)
    assert isinstance(embed.proj, torch.nn.Conv3d)  # the checkpoint's `patch_embed.proj.weight`, its shape
    assert embed.proj.weight.shape == (48, 3, 2, 14, 14)
    patches = torch.randn(37, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    conv = F.conv3d(patches.view(-1, 3, 2, 14, 14), embed.proj.weight, stride=(2, 14, 14)).view(-1, 48)
    ours = embed(patches)
    assert ours.shape == (37, 48)
    torch.testing.assert_close(ours, conv, rtol=1e-6, atol=1e-6 * conv.abs().max().item())
    assert relative_error(ours, conv) <= 1e-6


def test_patch_embedding_runs_through_the_module_so_its_hooks_apply():
    embed = vision.PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=8)
    seen = []
    embed.proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    embed(torch.randn(5, 3 * 2 * 14 * 14))
    assert seen == [torch.Size([5, 3 * 2 * 14 * 14])]


# -- the vision block: layout, compiled regions, flash-attn varlen -----------------------------------------------


def test_vision_block_equals_the_plain_chain_of_its_modules():
    config = vision_config()
    block = perturbed(vision.VambaVisionBlock(config))
    frames, rotary = frames_and_rotary(config)
    with torch.no_grad():
        ours, plain = block(frames, rotary), plain_block(block, frames, rotary)
    assert relative_error(ours, plain) <= 1e-6


def test_vision_attention_reads_views_of_the_projection_without_copies(monkeypatch):
    config = vision_config()
    block = perturbed(vision.VambaVisionBlock(config))
    frames, rotary = frames_and_rotary(config)
    seen = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append((q, k, v)) or
                        original(q, k, v, **kw))
    with torch.no_grad():
        block(frames, rotary)
    (query, key, value), = seen
    num_frames, length, heads, dim = 3, 24, config.num_heads, config.embed_dim // config.num_heads
    assert query.shape == key.shape == value.shape == (num_frames, heads, length, dim)
    # q and k: the (F, L, 2, heads, d) rows the rotary wrote; v: the (F, L, 3, heads, d) rows of the projection.
    assert query.untyped_storage().data_ptr() == key.untyped_storage().data_ptr()
    assert query.stride() == (length * 2 * heads * dim, dim, 2 * heads * dim, 1)
    assert value.stride() == (length * 3 * heads * dim, dim, 3 * heads * dim, 1)


def fake_flash_attn_varlen(calls):
    """flash-attn's variable-length function, computed by SDPA per sequence (what the real kernel computes)."""

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal):
        calls.append((q.shape, cu_seqlens_q.tolist(), max_seqlen_q, causal))
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        assert q.stride(-1) == 1 and not causal and dropout_p == 0.0
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            rows = [x[start:end].transpose(0, 1) for x in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*rows, scale=softmax_scale).transpose(0, 1)
        return out

    return varlen


def test_flash_attn_varlen_path_equals_sdpa(monkeypatch):
    calls = []
    config = vision_config()
    block = perturbed(vision.VambaVisionBlock(config))
    frames, rotary = frames_and_rotary(config)
    with torch.no_grad():
        expected = block(frames, rotary)
        monkeypatch.setattr(vision, "flash_attn_varlen_func", fake_flash_attn_varlen(calls))
        config._attn_implementation = "flash_attention_2"
        ours = block(frames, rotary)
    assert calls == [((3 * 24, config.num_heads, 16), [0, 24, 48, 72], 24, False)]
    assert relative_error(ours, expected) <= 1e-6


def test_flash_attention_2_without_flash_attn_keeps_transformers_function(monkeypatch):
    called = []
    config = vision_config()
    block = perturbed(vision.VambaVisionBlock(config))
    frames, rotary = frames_and_rotary(config)
    monkeypatch.setattr(vision, "flash_attn_varlen_func", None)
    monkeypatch.setattr(vision, "attention_interface",
                        lambda name: called.append(name) or layers.eager_attention_forward)
    config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        ours = block(frames, rotary)
    assert called == ["flash_attention_2"]
    assert relative_error(ours, plain_block(block, frames, rotary)) <= 1e-6


@pytest.mark.parametrize("region", ["attention_inputs", "block_output"])
def test_block_regions_trace_into_one_graph_shared_by_every_block(region):
    """What FusedOnCuda compiles on CUDA: one graph per region (no graph break), reused by every block of the tower
    (the blocks' weights are inputs, not constants; each block's own fused rotary is traced as its function), equal
    to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = getattr(vision.VambaVisionBlock, region)
    compiled = torch.compile(fn, backend=counter, dynamic=False, fullgraph=True)
    towers = tower(depth=3)
    frames, rotary = frames_and_rotary(towers.config)
    cos, sin = vision.rotation(rotary)
    with torch.no_grad():
        for block in towers.blocks:
            if region == "attention_inputs":
                args = (block, frames, cos, sin)
            else:
                args = (block, frames, torch.randn_like(frames))
            ours, eager = compiled(*args), fn(*args)
            ours, eager = (list(out) if isinstance(out, tuple) else [out] for out in (ours, eager))
            for got, want in zip(ours, eager, strict=True):  # the same layout: SDPA reads the views as they are
                assert got.shape == want.shape and got.stride() == want.stride()
                assert relative_error(got, want) <= 1e-6
    assert counter.frame_count == 1


def fused_passes(model: torch.nn.Module, *names: str) -> list:
    """The FusedOnCuda passes that `model`'s modules own (those of the attribute `names`, else all)."""
    return [value for module in model.modules() for name, value in vars(module).items()
            if isinstance(value, layers.FusedOnCuda) and (not names or name in names)]


def compile_for_cpu(monkeypatch, passes) -> list[dict]:
    """Make the FusedOnCuda `passes` compile for CPU tensors as they do on CUDA, with aot_eager (the graphs Inductor
    would get, without a compiler). Returns the torch.compile keyword arguments, one per compile."""
    calls = []
    for fused in passes:
        monkeypatch.setattr(fused, "device_type", "cpu")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or
                        real_compile(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    return calls


def test_compiled_regions_run_at_inference_only_and_equal_eager(monkeypatch):
    """The tower with its regions "compiled" for CPU tensors (aot_eager), against the same tower eagerly."""
    model = tower(max_frames=2, depth=2)
    layers.share_compile_state(model)  # as the model does (post_init)
    pixels, grid = video_pixels(5, 4, 6)
    with torch.no_grad():
        expected = model(pixels, grid)[0]
    compiled_calls = compile_for_cpu(monkeypatch, fused_passes(model, "compiled_attention_inputs",
                                                               "compiled_block_output"))
    with torch.no_grad():
        ours = model(pixels, grid)[0]
    assert compiled_calls == [dict(dynamic=False)] * 2  # one compiled function per region, for both blocks
    assert relative_error(ours, expected) <= 1e-6
    first = model.blocks[0].compiled_attention_inputs
    assert not first.compiles(pixels)  # autograd on: training runs eagerly
    with torch.no_grad():
        assert first.compiles(pixels)


@pytest.mark.parametrize("static_step", [False, True], ids=["plain-cache", "static-step"])
def test_fused_decoder_passes_generate_as_eager(monkeypatch, static_step):
    """The decoder's RMSNorm, text rotary and alpha balance "compiled" for CPU tensors as on CUDA, in the prefill and in the
    decoding steps (the static step is what DecodeGraph captures), against the eager model; and eager in training."""
    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", static_step)
    model = tiny_model()
    pixels, grid = video_pixels(4, 4, 6)
    kwargs = dict(input_ids=prompt(2, 5)[None], pixel_values_videos=pixels, video_grid_thw=grid, max_new_tokens=5,
                  do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        expected = model.generate(**kwargs)
    passes = fused_passes(model.model, "fused_norm", "fused_rotary", "fused_alpha_balance")
    calls = compile_for_cpu(monkeypatch, passes)
    with torch.no_grad():
        ours = model.generate(**kwargs)
    assert calls == [dict(dynamic=None)] * 3  # RMSNorm, rotary, alpha balance: one compiled function each
    assert torch.equal(ours.sequences, expected.sequences)
    assert relative_error(torch.stack(ours.scores), torch.stack(expected.scores)) <= 1e-6
    assert not any(fused.compiles(pixels) for fused in passes)


def test_fused_pass_under_an_outer_compile_is_traced_as_its_function(monkeypatch):
    fused = layers.FusedOnCuda(layers.rms_norm, "cpu", dynamic=None, inference_only=True)
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: pytest.fail("compiled again inside a traced model"))
    outer = torch._dynamo.optimize("eager", nopython=True)(lambda x, w: fused(x, w, 1e-6) * 2)
    x, weight = torch.randn(2, 8), torch.rand(8)
    with torch.no_grad():
        assert torch.equal(outer(x, weight), layers.rms_norm(x, weight, 1e-6) * 2)


# -- several videos at once --------------------------------------------------------------------------------------


def test_several_videos_in_one_batch_equal_each_alone():
    grids = [[4, 4, 6], [2, 4, 6], [6, 4, 6], [2, 6, 4], [4, 6, 4], [2, 4, 6]]
    pixels = torch.cat([video_pixels(*grid, seed=i)[0] for i, grid in enumerate(grids)])
    model = tower(max_frames=3)  # groups of 3 steps: the batched groups cross video boundaries
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[:2])))
    with torch.no_grad():
        alone = model(pixels, torch.tensor(grids))
        calls_alone, seen[:] = len(seen), []
        model.batch_items = True
        together = model(pixels, torch.tensor(grids))
    # runs of one frame size: 12 steps of 4x6, then 6 of 6x4, then 2 of 4x6
    assert seen == [(3, 24)] * 4 + [(3, 24)] * 2 + [(2, 24)]
    assert calls_alone == 2 + 1 + 2 + 1 + 2 + 1 and len(seen) < calls_alone
    assert len(together) == len(alone) == len(grids)
    for ours, expected, (t, h, w) in zip(together, alone, grids):
        assert ours.shape == expected.shape == (t * h * w // 4, 64)
        assert relative_error(ours, expected) <= 1e-6


def test_batched_vision_tower_gives_the_same_generation():
    model = tiny_model()
    grids = [[4, 4, 6], [2, 4, 6]]
    pixels = torch.cat([video_pixels(*grid, seed=i)[0] for i, grid in enumerate(grids)])
    ids, mask = left_pad([prompt(2, 3, seed=0), prompt(4, 2, seed=1)])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=torch.tensor(grids),
                  max_new_tokens=5, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                  output_scores=True)
    with torch.no_grad():
        alone = model.generate(**kwargs)
        model.visual.batch_items = True
        together = model.generate(**kwargs)
    assert torch.equal(alone.sequences, together.sequences)
    assert relative_error(torch.stack(together.scores), torch.stack(alone.scores)) <= 1e-6


# -- decoding: no per-step work on the visual length besides attention -------------------------------------------


VISUAL_TOKENS = 210  # (6, 10, 14) patches -> 6 * 5 * 7 tokens: a length no weight or text tensor has
METADATA = {"shape", "size", "dim", "stride", "device", "dtype", "is_cuda", "numel", "data_ptr", "layout", "ndim",
            "requires_grad", "is_floating_point", "element_size", "untyped_storage", "storage_offset", "grad_fn",
            "is_contiguous", "__len__", "itemsize", "is_meta", "is_sparse", "is_quantized", "is_nested", "names",
            "_base", "grad", "is_leaf", "_is_view", "__hash__", "__eq__"}

IN_PLACE_OPERATORS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__"}


def function_name(func) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return getattr(owner, "__name__", str(owner))
    return getattr(func, "__name__", str(func))


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        yield from tensors_in(list(value.values()))


class VisualLengthWork(TorchFunctionMode):
    """Records every torch call that reads or writes a tensor with a visual-length dimension, other than attention,
    metadata, and views (results that share the input's storage and write nothing)."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.calls = length, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = function_name(func)
        inputs = list(tensors_in((args, kwargs)))
        if func is F.scaled_dot_product_attention or name in METADATA:
            return result
        touched = [t for t in [*inputs, *tensors_in(result)] if self.length in t.shape]
        if not touched:
            return result
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        outputs = list(tensors_in(result))
        writes = (name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_OPERATORS
        is_view = (outputs and not writes and all(t.untyped_storage().data_ptr() in storages for t in outputs))
        if not is_view:
            self.calls.append(name)
        return result


def decode_steps_work(model, ids, mask, pixels, grid, steps=3):
    """Prefill, one decoding step (which may format what the prefill left), then `steps` steps under the recorder."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels, video_grid_thw=grid)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(steps + 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            recorder = VisualLengthWork(VISUAL_TOKENS)
            with recorder if step else torch.no_grad():
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if step:
                yield recorder.calls


@pytest.mark.parametrize("static_step", [False, True], ids=["plain-cache", "static-step"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-video", "padded-batch"])
def test_decoding_step_does_no_visual_length_work_besides_attention(monkeypatch, static_step, padded):
    from vamba_hf.cache_vamba import DecodeGraph

    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", static_step)
    static_steps, step = [], DecodeGraph.step
    monkeypatch.setattr(DecodeGraph, "step", lambda self, *a: static_steps.append(1) or step(self, *a))
    model = tiny_model()
    pixels, grid = video_pixels(6, 10, 14)
    if padded:  # a second, shorter video: the first row's cross-attention reads padded keys through a mask
        short, short_grid = video_pixels(2, 4, 4, seed=1)
        pixels, grid = torch.cat([pixels, short]), torch.cat([grid, short_grid])
        ids, mask = left_pad([prompt(3, 2, seed=0), prompt(1, 4, seed=1)])
    else:
        ids = prompt(3, 2)[None]
        mask = torch.ones_like(ids)
    calls = list(decode_steps_work(model, ids, mask, pixels, grid))
    assert calls == [[], [], []]
    assert len(static_steps) == (4 if static_step else 0)  # the path under test ran


def test_beam_search_steps_do_no_visual_length_work_in_the_static_step(monkeypatch):
    """Beams of two videos read the cache's K/V of each video in place (no per-step gather), in the step that
    DecodeGraph captures."""
    monkeypatch.setattr(VambaForConditionalGeneration, "static_decode_step_off_cuda", True)
    model = tiny_model()
    pixels, grid = video_pixels(6, 10, 14)
    short, short_grid = video_pixels(2, 4, 4, seed=1)
    ids, mask = left_pad([prompt(3, 2, seed=0), prompt(1, 4, seed=1)])
    forwards, steps = [], []

    def start(module, args, kwargs):
        forwards.append(1)
        if len(forwards) > 2:  # after the prefill and the first step
            steps.append(VisualLengthWork(VISUAL_TOKENS))
            steps[-1].__enter__()

    def stop(module, args, kwargs, output):
        if len(forwards) > 2:
            steps[-1].__exit__(None, None, None)

    model.register_forward_pre_hook(start, with_kwargs=True)
    model.register_forward_hook(stop, with_kwargs=True)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat([pixels, short]),
                       video_grid_thw=torch.cat([grid, short_grid]), num_beams=2, max_new_tokens=5, do_sample=False,
                       eos_token_id=None)
    assert [recorder.calls for recorder in steps] == [[], [], []]


def test_the_recorder_sees_visual_length_work(monkeypatch):
    """The recorder above catches a per-step cast of the cross K/V (the failure it guards against)."""
    from vamba_hf.cache_vamba import CrossStore

    original = CrossStore.read
    monkeypatch.setattr(CrossStore, "read", lambda self, *args, **kwargs: tuple(
        t.to(torch.float32) * 1.0 for t in original(self, *args, **kwargs)))
    model = tiny_model()
    pixels, grid = video_pixels(6, 10, 14)
    ids = prompt(3, 2)[None]
    calls = list(decode_steps_work(model, ids, torch.ones_like(ids), pixels, grid, steps=1))
    assert calls == [["mul"] * 2 * model.config.num_hidden_layers]
