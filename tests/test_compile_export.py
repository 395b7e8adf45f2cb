"""Compiled, exported and static-cache runs equal the eager ones, as transformers' common tests check them for a
model that sets `_can_compile_fullgraph`: `cache_implementation="static"`, `torch.compile(model.forward)`, a
fullgraph-compiled decoding step, `torch.export` (the text forward whole; with pixels, the vision tower and the decoder
reading its output), and custom 4D attention masks. The input checks keep their messages: eagerly as before, inside a
traced graph where a value decides (a placeholder without its video)."""

import copy

import pytest
import torch
from helpers import EOS, left_pad, prompt, tiny_model, video_pixels
from transformers import CompileConfig
from transformers.cache_utils import DynamicCache

from vamba_hf.cache_vamba import VambaStaticCache
from vamba_hf.modeling_vamba import CACHE_NAME

GREEDY = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    """Two left-padded prompts of different lengths, each with a video of its own size."""
    (first, first_grid), (second, second_grid) = video_pixels(2, 4, 6), video_pixels(2, 4, 4, seed=3)
    ids, mask = left_pad([prompt(2, 4, seed=1), prompt(7, 2, seed=2)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat([first, second]),
                video_grid_thw=torch.cat([first_grid, second_grid]))


def text_batch():
    ids, mask = left_pad([prompt(2, 4, seed=1, visual=False), prompt(7, 2, seed=2, visual=False)])
    return dict(input_ids=ids, attention_mask=mask)


def fullgraph_decoding() -> CompileConfig:
    """generate's compiled decoding step, fullgraph, on any device (transformers compiles on accelerators only by
    default); the "eager" backend keeps the test fast: dynamo's tracing is what a graph break would fail."""
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("visual", [True, False])
def test_static_cache_generates_the_dynamic_cache_ids(model, batch, visual):
    inputs = batch if visual else text_batch()
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GREEDY)
        static = model.generate(**inputs, cache_implementation="static", return_dict_in_generate=True, **GREEDY)
        again = model.generate(**inputs, cache_implementation="static", **GREEDY)  # a kept cache is reset
    assert isinstance(getattr(static, CACHE_NAME), VambaStaticCache)
    assert torch.equal(static.sequences, dynamic) and torch.equal(again, dynamic)


def test_beam_search_over_a_static_cache_equals_the_dynamic_cache(model, batch):
    """Beams reorder the static buffers in place, and the cross-attention store with them."""
    beams = dict(GREEDY, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        dynamic = model.generate(**batch, **beams)
        static = model.generate(**batch, cache_implementation="static", **beams)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_over_a_static_cache_equals_greedy(model, mode):
    """Assisted decoding crops the static cache after each rejected candidate (transformers 4 crops to a length, 5
    by a count)."""
    pixels, grid = video_pixels(2, 4, 6)
    common = dict(input_ids=prompt(2, 4)[None], pixel_values_videos=pixels, video_grid_thw=grid, max_new_tokens=8,
                  do_sample=False, eos_token_id=EOS)
    assisted = (dict(prompt_lookup_num_tokens=2) if mode == "prompt_lookup"
                else dict(assistant_model=tiny_model(num_hidden_layers=1)))
    with torch.no_grad():
        greedy = model.generate(**common)
        static = model.generate(**common, cache_implementation="static", **assisted)
    assert torch.equal(static, greedy)


def test_fullgraph_compiled_static_decoding_generates_the_eager_ids(model, batch):
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(**batch, **GREEDY)
        compiled = model.generate(**batch, cache_implementation="static", compile_config=fullgraph_decoding(),
                                  **GREEDY)
    assert torch.equal(compiled, eager)


def test_compiled_static_decoding_is_one_graph_for_every_step(batch):
    """A decoding step reads where it writes from the static cache's device counter, so nothing the compiled step
    guards on changes from one step to the next: one graph serves every step of every call, with no recompilation
    (what transformers' common generation test checks)."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
    config._compile_all_devices = True
    model = tiny_model()
    torch._dynamo.reset()
    with torch.no_grad():
        for _ in range(2):
            model.generate(**batch, cache_implementation="static", compile_config=config, **GREEDY)
    assert len(graphs) == 1


@pytest.mark.parametrize("visual", [True, False])
def test_compiled_forward_generates_the_eager_ids(batch, visual):
    """torch.compile(model.forward): without graph breaks for text (prefill and the default cache's steps); a
    prefill with pixels lays out the visual stream by the grid's values, which breaks the graph there."""
    model, inputs = tiny_model(), batch if visual else text_batch()
    with torch.no_grad():
        eager_logits = model(**inputs).logits
        eager = model.generate(**inputs, **GREEDY)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=not visual)
        compiled_logits = model(**inputs).logits
        compiled = model.generate(**inputs, **GREEDY)
    torch.testing.assert_close(compiled_logits, eager_logits)
    assert torch.equal(compiled, eager)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def test_text_forward_exports_and_keeps_its_placeholder_check(model):
    inputs = text_batch()
    with torch.no_grad():
        program = torch.export.export(Logits(model), (inputs["input_ids"], inputs["attention_mask"]), strict=True)
        exported = program.module()
        torch.testing.assert_close(exported(inputs["input_ids"], inputs["attention_mask"]), model(**inputs).logits)
        ids = inputs["input_ids"].clone()
        ids[0, -1] = model.config.vision_start_token_id
        with pytest.raises(RuntimeError, match="placeholder but no image or video"):
            exported(ids, inputs["attention_mask"])
        with pytest.raises(ValueError, match="1 <\\|vision_start\\|> placeholder\\(s\\) but 0"):
            model(input_ids=ids, attention_mask=inputs["attention_mask"])


class FrameEncoder(torch.nn.Module):
    """The vision tower's encoding of one frame size: what decides the frame groups and the items from the grid's
    values stays outside the program."""

    def __init__(self, model, height, width):
        super().__init__()
        self.tower, self.height, self.width = model.visual, height, width

    def forward(self, patches):
        return self.tower.encode_frames(patches, self.height, self.width)


class VisualEmbedsLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *visual_embeds):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, visual_embeds=list(visual_embeds),
                          use_cache=False).logits


def test_the_pixel_path_exports_as_the_tower_and_the_decoder(model, batch):
    """A forward from pixels lays out frame groups and rows by the grid's values on the host, so it exports as two
    programs: the vision tower per frame size, and the decoder reading the tower's output as `visual_embeds`, one
    video per row (rows of different lengths padded in the graph, the placeholders checked there), which also
    compiles as one graph."""
    sizes = batch["video_grid_thw"].tolist()
    rows = batch["pixel_values_videos"].split([t * h * w for t, h, w in sizes])
    with torch.no_grad():
        towers = [torch.export.export(FrameEncoder(model, h, w), (pixels,), strict=True).module()
                  for pixels, (_, h, w) in zip(rows, sizes)]
        embeds = [tower(pixels) for tower, pixels in zip(towers, rows)]
        args = (batch["input_ids"], batch["attention_mask"], *embeds)
        decoder = torch.export.export(VisualEmbedsLogits(model), args, strict=True).module()
        eager = model(**batch).logits
        torch.testing.assert_close(decoder(*args), eager)
        torch._dynamo.reset()
        compiled = torch.compile(VisualEmbedsLogits(model), backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), eager)
        ids = batch["input_ids"].clone()
        ids[ids == model.config.vision_start_token_id] = 0
        with pytest.raises(RuntimeError, match="reads one image or video per row"):
            decoder(ids, batch["attention_mask"], *embeds)
        with pytest.raises(ValueError, match="0 <\\|vision_start\\|> placeholder\\(s\\) but 2"):
            model(input_ids=ids, attention_mask=batch["attention_mask"], visual_embeds=embeds)


def packed_mask(lengths, dtype):
    """One row of consecutive sequences, each causal within itself: bool, or additive floats."""
    total = sum(lengths)
    keep = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length in lengths:
        keep[start:start + length, start:start + length] = torch.ones(length, length, dtype=torch.bool).tril()
        start += length
    if dtype == torch.bool:
        return keep[None, None]
    return torch.zeros(total, total, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_custom_4d_mask_packs_sequences_as_if_each_ran_alone(model, mask_dtype, implementation):
    """transformers' test_custom_4d_attention_mask: sequences packed in one row under a 4D mask, with positions
    restarting, give each sequence's own logits."""
    model.set_attn_implementation(implementation)
    sequences = [prompt(3, 0, seed=s, visual=False) for s in (4, 5, 6)]
    lengths = [len(s) for s in sequences]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.cat(sequences)[None], attention_mask=packed_mask(lengths, mask_dtype),
                           position_ids=positions).logits
            alone = torch.cat([model(input_ids=s[None]).logits for s in sequences], dim=1)
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_custom_4d_mask_equals_the_padding_mask_it_expresses(model, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    keep = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    visual = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        from_2d = model(**batch).logits
        from_4d = model(input_ids=ids, attention_mask=keep[:, None], position_ids=positions, **visual).logits
    real = mask.bool()
    torch.testing.assert_close(from_4d[real], from_2d[real])


def test_a_4d_mask_of_the_wrong_shape_or_type_is_refused(model):
    ids = prompt(3, 0, visual=False)[None]
    with pytest.raises(ValueError, match="4D mask must be \\(batch, 1, new tokens, keys\\) = \\(1, 1, 3, 3\\)"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="4D mask of torch.int64"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.long))


def test_a_cache_position_the_cache_does_not_continue_is_refused(model):
    """transformers' exportable static-cache wrappers keep a cache of their own and pass `cache_position`; Vamba's
    cache (which also holds the cross-attention K/V) is the one a forward returns. A step on a cache that does not
    hold the positions it names is refused, never decoded without its prompt."""
    ids = prompt(2, 4, visual=False)[None]
    with torch.no_grad():
        prefill = model(input_ids=ids, use_cache=True)
        cache, step = getattr(prefill, CACHE_NAME), prefill.logits[:, -1:].argmax(-1)
        plain = model(input_ids=step, **{CACHE_NAME: copy.deepcopy(cache)}).logits
        at_its_end = model(input_ids=step, cache_position=torch.tensor([ids.shape[1]]),
                           **{CACHE_NAME: copy.deepcopy(cache)}).logits
        torch.testing.assert_close(at_its_end, plain)
        with pytest.raises(ValueError, match=f"cache_position starts at {ids.shape[1]} but the cache holds 0"):
            model(input_ids=step, cache_position=torch.tensor([ids.shape[1]]), **{CACHE_NAME: DynamicCache()})
