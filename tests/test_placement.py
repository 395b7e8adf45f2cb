"""Placement over several devices with accelerate's `device_map`, on CPU: the maps accelerate infers for two GPUs
keep each decoder layer (with its Mamba-2 block) and each vision block whole; a model dispatched with hooks
generates exactly what the plain model does, and the cache keeps each layer's cross K/V on that layer's device."""

import copy
import warnings

import pytest
import torch
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights

from vamba_hf import VambaConfig, VambaForConditionalGeneration
from vamba_hf.demo import demo_config
from vamba_hf.tiny import TINY_SIZES, build_tiny_tokenizer, special_token_ids, tiny_config


def meta_model(config) -> VambaForConditionalGeneration:
    with init_empty_weights():
        return VambaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def device_of(device_map: dict, name: str):
    """The device the map gives module `name`: that of the longest map entry that is it or one of its parents."""
    owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    return device_map[max(owners, key=len)]


def infer_map(model, first_gpu_bytes: int, no_split) -> dict:
    """The map for two GPUs: `first_gpu_bytes` on GPU 0, room for everything on GPU 1."""
    max_memory = {0: first_gpu_bytes, 1: nbytes(model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Device 0 is not available": there is no GPU, the map is all we want
        return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                     dtype=next(model.parameters()).dtype)


def inside(device_map: dict, prefix: str) -> list:
    """Map entries strictly inside a module named `prefix<N>` (e.g. `model.layers.3.mlp`)."""
    return [key for key in device_map if key.startswith(prefix) and "." in key[len(prefix):]]


def budgets(model) -> list[int]:
    """GPU-0 budgets, every 1% of the model (5% for the 7B one, whose maps take longer to infer)."""
    every = 5 if model.config.num_hidden_layers > 8 else 1
    return [nbytes(model) * step // 100 for step in range(1, 100, every)]


# The tiny sizes with a second vision block, so that a map could split the blocks.
CONFIGS = {"7B": lambda: VambaConfig(),
           "tiny": lambda: tiny_config(vision_config=dict(TINY_SIZES["vision_config"], depth=2))}


def assert_kept_whole(model, prefix: str, count: int, parts=()) -> None:
    """At every budget the `prefix<N>` modules stay whole (and their `parts` with them); at some budget accelerate,
    told nothing about unsplittable modules, would cut one in two, and at some they land on both GPUs."""
    would_split = spread = False
    for budget in budgets(model):
        would_split |= bool(inside(infer_map(model, budget, no_split=[]), prefix))
        device_map = infer_map(model, budget, no_split=model._no_split_modules)
        assert inside(device_map, prefix) == [], f"GPU-0 budget {budget}: a {prefix}N module is split"
        devices = [device_of(device_map, f"{prefix}{i}") for i in range(count)]
        spread |= set(devices) == {0, 1}
        for i, device in enumerate(devices):
            for part in parts:
                assert device_of(device_map, f"{prefix}{i}.{part}") == device
    assert would_split, f"no budget would split a {prefix}N module even without _no_split_modules"
    assert spread, f"no budget put {prefix}N modules on both GPUs"


@pytest.mark.parametrize("size", sorted(CONFIGS))
def test_two_gpu_map_keeps_decoder_layers_whole(size):
    model = meta_model(CONFIGS[size]())
    assert "VambaDecoderLayer" in model._no_split_modules
    assert_kept_whole(model, "model.layers.", model.config.num_hidden_layers,
                      parts=("vision_mixer", "vision_mixer.mixer", "cross_attn", "self_attn", "mlp"))


@pytest.mark.parametrize("size", sorted(CONFIGS))
def test_two_gpu_map_keeps_vision_blocks_whole(size):
    model = meta_model(CONFIGS[size]())
    assert "VambaVisionBlock" in model._no_split_modules
    assert_kept_whole(model, "visual.blocks.", len(model.visual.blocks))


@pytest.fixture(scope="module")
def tiny_model_and_inputs():
    tokenizer = build_tiny_tokenizer()
    config = demo_config(tokenizer)
    torch.manual_seed(0)
    model = VambaForConditionalGeneration(config).eval()
    ids = special_token_ids(tokenizer)
    prompt = [ids["im_start_token_id"], 20, 21, ids["vision_start_token_id"], ids["vision_end_token_id"], 30, 31,
              ids["eos_token_id"], ids["im_start_token_id"], 22]
    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.tensor([prompt]),
              "pixel_values_videos": torch.randn(4 * 4 * 4, 3 * 2 * 14 * 14, generator=generator),
              "video_grid_thw": torch.tensor([[4, 4, 4]])}
    return model, inputs


def two_device_map(model) -> dict:
    """A map accelerate infers for two GPUs, decoder layers on both, with every device replaced by the CPU (the
    only device here)."""
    for budget in budgets(model):
        device_map = infer_map(model, budget, model._no_split_modules)
        layers = {device_of(device_map, f"model.layers.{i}") for i in range(model.config.num_hidden_layers)}
        if layers == {0, 1}:
            break
    assert layers == {0, 1}
    return {name: "cpu" for name in device_map}


def greedy(model, inputs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)


def test_dispatched_model_generates_what_the_plain_model_does(tiny_model_and_inputs):
    model, inputs = tiny_model_and_inputs
    expected = greedy(model, inputs)
    device_map = two_device_map(model)
    assert any(name.startswith("model.layers.") for name in device_map)
    dispatched = dispatch_model(copy.deepcopy(model), device_map, force_hooks=True)
    assert hasattr(dispatched.model.layers[0], "_hf_hook"), "dispatch_model attached no hook"
    got = greedy(dispatched, inputs)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(torch.stack(got.scores), torch.stack(expected.scores))


def test_cross_kv_of_each_layer_lives_on_that_layers_device(tiny_model_and_inputs):
    model, inputs = tiny_model_and_inputs
    dispatched = dispatch_model(copy.deepcopy(model), two_device_map(model), force_hooks=True)
    with torch.inference_mode():
        out = dispatched(**inputs, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # the field is `cache` from transformers 5.24 on
    # `VambaCache.cross.kv` ({layer index: (key, value)}) is how the cache exposes its cross K/V today.
    cross_kv = cache.cross.kv
    assert sorted(cross_kv) == list(range(model.config.num_hidden_layers))
    for index, (key, value) in cross_kv.items():
        layer_device = next(dispatched.model.layers[index].parameters()).device
        assert key.device == value.device == layer_device
        assert key.shape[-2] == value.shape[-2] > 0
