"""Training with the transformers stack: the loss, autograd through the PyTorch path, gradient checkpointing, packed
rows, LoRA and a frozen vision tower. Runs on the golden fixtures' tiny models (CPU, fp32)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import VISION_END, VISION_START, enable_checkpointing, golden_batch, golden_model, golden_video
from helpers import relative_error as relative

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.mamba2_vamba import Mamba2

# -- loss ---------------------------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(golden_dir):
    model = golden_model(golden_dir, "video_short").eval()
    batch = golden_batch(golden_dir)
    out = model(**batch, use_cache=False)
    expected = F.cross_entropy(out.logits[0, :-1].double(), batch["labels"][0, 1:], ignore_index=-100)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)

    supervised = int((batch["labels"][:, 1:] != -100).sum())
    summed = model(**batch, use_cache=False, num_items_in_batch=torch.tensor(2 * supervised)).loss
    assert summed.item() == pytest.approx(expected.item() / 2, rel=1e-6)


def test_loss_with_logits_to_keep_covers_the_kept_positions(golden_dir):
    model = golden_model(golden_dir, "video_short").eval()
    batch = golden_batch(golden_dir)
    full = model(**batch, use_cache=False)
    kept = model(**batch, use_cache=False, logits_to_keep=4)
    assert kept.logits.shape[1] == 4
    torch.testing.assert_close(kept.logits, full.logits[:, -4:], rtol=1e-5, atol=1e-5)
    expected = F.cross_entropy(full.logits[0, -4:-1].double(), batch["labels"][0, -3:])
    assert kept.loss.item() == pytest.approx(expected.item(), rel=1e-5)


# -- autograd and gradient checkpointing ------------------------------------------------------------------------------


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_every_used_parameter_gets_a_gradient(golden_dir):
    model = golden_model(golden_dir, "video_short").train()
    _, grads = loss_and_gradients(model, golden_batch(golden_dir))
    last = model.config.num_hidden_layers - 1
    # The last layer's Mamba-2 block feeds no one; everything else, vision tower included, must learn.
    unused = {name for name, _ in model.named_parameters() if name.startswith(f"model.layers.{last}.vision_mixer.")}
    expected = {name for name, _ in model.named_parameters()} - unused
    assert set(grads) == expected
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_gradient_matches_finite_differences(golden_dir):
    """A float64 model's gradients vs. central differences of its final hidden states, through both streams. The
    norms, rotary and Mamba-2 compute in fp32 inside, which bounds the agreement to about 1% (the exact check of
    the Mamba-2 path is the reference test below)."""
    model = golden_model(golden_dir, "video_short", dtype=torch.float64).train()
    batch = golden_batch(golden_dir)
    del batch["labels"]
    batch["pixel_values_videos"] = batch["pixel_values_videos"].double()
    probe = torch.randn(1, 16, model.config.hidden_size, dtype=torch.float64)

    def objective():
        return (model(**batch, output_hidden_states=True).hidden_states[-1] * probe).sum()

    objective().backward()
    parameters = dict(model.named_parameters())
    for name in ["visual.blocks.0.attn.qkv.weight", "model.layers.0.vision_mixer.mixer.A_log",
                 "model.layers.1.vision_mixer.mixer.in_proj.weight", "model.layers.2.cross_attn.k_proj.weight",
                 "model.layers.1.alpha", "model.layers.0.mlp.up_proj.weight"]:
        direction = torch.randn(parameters[name].shape, dtype=torch.float64)
        direction /= direction.norm()
        eps = 1e-2
        with torch.no_grad():
            parameters[name].add_(eps * direction)
            plus = objective()
            parameters[name].sub_(2 * eps * direction)
            minus = objective()
            parameters[name].add_(eps * direction)
        numeric = (plus - minus).item() / (2 * eps)
        analytic = (parameters[name].grad * direction).sum().item()
        assert analytic == pytest.approx(numeric, rel=3e-2), name


def reference_mamba(mixer, u, seq_lengths):
    """Mamba-2 step by step in float64, each packed sequence run on its own (spec section 3)."""
    cfg = mixer.config
    d_inner, heads, bc = mixer.d_inner, mixer.nheads, cfg.ngroups * cfg.d_state
    weight = {name: p.double() for name, p in mixer.named_parameters()}
    outputs = []
    for part in u.double().split(seq_lengths, dim=1):
        z, xbc, dt = F.linear(part, weight["in_proj.weight"]).split([d_inner, d_inner + 2 * bc, heads], dim=-1)
        xbc = F.conv1d(xbc.transpose(1, 2), weight["conv1d.weight"], weight["conv1d.bias"], padding=cfg.d_conv - 1,
                       groups=xbc.shape[-1])[..., : part.shape[1]]
        x, B, C = F.silu(xbc.transpose(1, 2)).split([d_inner, bc, bc], dim=-1)
        x = x.unflatten(-1, (heads, cfg.headdim))
        dt = F.softplus(dt + weight["dt_bias"])
        A = -torch.exp(weight["A_log"])
        state = x.new_zeros(x.shape[0], heads, cfg.headdim, cfg.d_state)
        ys = []
        for t in range(part.shape[1]):  # one group: every head reads the same B and C
            state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[
                :, t, None, None, :]
            ys.append((state * C[:, t, None, None, :]).sum(-1) + weight["D"][:, None] * x[:, t])
        y = torch.stack(ys, dim=1).flatten(-2) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * weight["norm.weight"]
        outputs.append(F.linear(y, weight["out_proj.weight"]))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("max_tokens", [None, 40])
def test_pytorch_mamba_gradients_match_a_step_by_step_reference(golden_dir, max_tokens):
    """Chunked scan + causal conv (torch path) vs. the plain recurrence: output and gradients, with packed
    sequences (seq_idx) and, for max_tokens=40, segments carrying the state across."""
    mixer = golden_model(golden_dir, "video_short").model.layers[0].vision_mixer.mixer
    if max_tokens:
        mixer.max_tokens = max_tokens
    seq_lengths = [37, 50, 13]
    u = torch.randn(2, sum(seq_lengths), mixer.config.hidden_dim, requires_grad=True)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(seq_lengths)]).expand(2, -1)
    u64 = u.detach().double().requires_grad_()
    params = [p for _, p in mixer.named_parameters()]

    out = mixer(u, seq_idx)
    expected = reference_mamba(mixer, u64, seq_lengths)
    assert relative(out, expected) < 1e-5
    probe = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe.float()).sum(), [u, *params])
    expected_grads = torch.autograd.grad((expected * probe).sum(), [u64, *params])
    for name, got, want in zip(["u", *dict(mixer.named_parameters())], grads, expected_grads):
        assert relative(got, want) < 1e-4, name


def count_calls(module):
    calls = []
    # A pre-hook: non-reentrant recomputation stops as soon as the saved tensors are back, before forward hooks.
    module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("reentrant", [None, True])
def test_gradient_checkpointing_gives_the_same_gradients(golden_dir, reentrant):
    model = golden_model(golden_dir, "video_short").train()
    batch = golden_batch(golden_dir)
    loss, grads = loss_and_gradients(model, batch)

    enable_checkpointing(model, None if reentrant is None else {"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in [*model.model.layers, *model.visual.blocks])
    layer_calls = count_calls(model.model.layers[0].input_layernorm)
    block_calls = count_calls(model.visual.blocks[0].norm1)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model, batch)
    assert len(layer_calls) == 2 and len(block_calls) == 2  # forward, then recomputed in backward: both streams

    assert checkpointed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert set(checkpointed_grads) == set(grads)
    for name, grad in grads.items():
        assert relative(checkpointed_grads[name], grad) < 1e-5, name


def test_gradient_checkpointing_trains_behind_frozen_inputs(golden_dir):
    """Frozen embeddings and vision tower: the layers' inputs need no gradient, their weights do."""
    model = golden_model(golden_dir, "video_short").train()
    model.freeze_vision_tower()
    model.get_input_embeddings().requires_grad_(False)
    enable_checkpointing(model)
    _, grads = loss_and_gradients(model, golden_batch(golden_dir))
    assert "model.layers.0.vision_mixer.mixer.in_proj.weight" in grads
    assert "model.layers.0.self_attn.q_proj.weight" in grads
    assert not any(name.startswith("visual.") for name in grads)


def test_use_cache_is_dropped_under_gradient_checkpointing(golden_dir):
    model = golden_model(golden_dir, "video_short").train()
    enable_checkpointing(model)
    out = model(**golden_batch(golden_dir), use_cache=True)
    assert out.past_key_values is None


def test_freeze_vision_tower(golden_dir):
    model = golden_model(golden_dir, "video_short")
    assert model.freeze_vision_tower() is model
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("visual."))
    model.freeze_vision_tower(False)
    assert all(p.requires_grad for p in model.parameters())


# -- packed rows ----------------------------------------------------------------------------------------------------


def prompt(length, seed, with_video):
    ids = torch.randint(0, 298, (length,), generator=torch.Generator().manual_seed(seed))
    if with_video:
        ids[3], ids[4] = VISION_START, VISION_END
    return ids


def run_alone(model, ids, video):
    inputs = {"input_ids": ids[None], "use_cache": False}
    if video is not None:
        inputs["pixel_values_videos"], inputs["video_grid_thw"] = video
    with torch.no_grad():
        return model(**inputs).logits[0]


def pack(rows, pad_id=304):
    """rows: lists of (ids, video or None) -> the packed batch, padded at the end, and each segment's span."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    spans, pixels, grids = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for ids, video in row:
            end = start + len(ids)
            input_ids[r, start:end], position_ids[r, start:end], attention_mask[r, start:end] = ids, torch.arange(
                len(ids)), 1
            spans.append((r, start, end))
            if video is not None:
                pixels.append(video[0])
                grids.append(video[1])
            start = end
    batch = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
             "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids)}
    return batch, spans


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", ["official", "position_embeddings", "mamba_segments"])
def test_packed_row_equals_each_pair_alone(golden_dir, implementation, variant):
    model = golden_model(golden_dir, "video_long", implementation).eval()
    if variant == "position_embeddings":
        model.config.cross_attn_use_position_embeddings = True
    if variant == "mamba_segments":  # Mamba-2 scans 80-token segments: a video boundary inside one, carries across
        for module in model.modules():
            if isinstance(module, Mamba2):
                module.max_tokens = 80
    short, long = golden_video(golden_dir, "video_short"), golden_video(golden_dir, "video_long")
    pairs = [(prompt(12, 1, True), short), (prompt(9, 2, True), long), (prompt(7, 3, False), None),
             (prompt(10, 4, True), short)]
    rows = [[pairs[0], pairs[1]], [pairs[2], pairs[3]]]  # row 1: a text-only segment, then a video; padded
    batch, spans = pack(rows)
    with torch.no_grad():
        packed = model(**batch).logits
    for (ids, video), (row, start, end) in zip([pair for row in rows for pair in row], spans):
        assert relative(packed[row, start:end], run_alone(model, ids, video)) < 1e-4


def test_packed_row_without_attention_mask(golden_dir):
    """The padding-free layout of DataCollatorWithFlattening: one row, position_ids only."""
    model = golden_model(golden_dir, "video_long").eval()
    short, long = golden_video(golden_dir, "video_short"), golden_video(golden_dir, "video_long")
    pairs = [(prompt(11, 5, True), long), (prompt(8, 6, True), short)]
    batch, spans = pack([pairs])
    del batch["attention_mask"]
    with torch.no_grad():
        out = model(**batch)
    assert out.past_key_values is None
    for (ids, video), (_, start, end) in zip(pairs, spans):
        assert relative(out.logits[0, start:end], run_alone(model, ids, video)) < 1e-4


def test_packed_loss_and_gradients_run(golden_dir):
    model = golden_model(golden_dir, "video_long").train()
    enable_checkpointing(model)
    pairs = [(prompt(11, 5, True), golden_video(golden_dir, "video_long")),
             (prompt(8, 6, True), golden_video(golden_dir, "video_short"))]
    batch, _ = pack([pairs])
    labels = batch["input_ids"].clone()
    labels[:, :6] = -100
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.layers[0].vision_mixer.mixer.A_log.grad.abs().sum() > 0


def test_packed_segment_with_two_videos_is_rejected(golden_dir):
    model = golden_model(golden_dir, "video_short")
    ids = prompt(12, 1, True)
    ids[7], ids[8] = VISION_START, VISION_END
    video = golden_video(golden_dir, "video_short")
    batch, _ = pack([[(ids, video), (prompt(6, 2, False), video)]])
    with pytest.raises(ValueError, match="more than one <\\|vision_start\\|>"):
        model(**batch)


def test_packed_rows_need_as_many_videos_as_placeholders(golden_dir):
    model = golden_model(golden_dir, "video_short")
    video = golden_video(golden_dir, "video_short")
    batch, _ = pack([[(prompt(12, 1, True), video), (prompt(6, 2, True), video)]])
    batch["pixel_values_videos"], batch["video_grid_thw"] = video
    with pytest.raises(ValueError, match="placeholder"):
        model(**batch)


def test_generation_position_ids_are_not_taken_for_packing(golden_dir):
    """Left-padded prompts as generate() sees them (pads at position 1) stay one segment per row."""
    model = golden_model(golden_dir, "video_short").eval()
    batch = golden_batch(golden_dir)
    ids = torch.cat([torch.full((1, 3), 304), batch["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    video = {"pixel_values_videos": batch["pixel_values_videos"], "video_grid_thw": batch["video_grid_thw"]}
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **video).logits
        alone = model(input_ids=batch["input_ids"], use_cache=False, **video).logits
    assert relative(padded[:, 3:], alone) < 1e-5


# -- LoRA ----------------------------------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj"]


def test_lora_trains_saves_loads_and_merges(golden_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = golden_model(golden_dir, "video_short")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(LORA_TARGETS)
    assert not any(p.requires_grad for name, p in lora.named_parameters() if "lora_" not in name)

    lora.train()
    enable_checkpointing(lora)
    batch = golden_batch(golden_dir)
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = lora(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    mamba_lora = lora.base_model.model.model.layers[0].vision_mixer.mixer.in_proj.lora_B["default"].weight
    assert mamba_lora.abs().sum() > 0

    lora.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        tuned = lora(**inputs, use_cache=False).logits
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(golden_model(golden_dir, "video_short"), tmp_path / "adapter").eval()
    merged = lora.merge_and_unload()
    assert isinstance(merged, VambaForConditionalGeneration)
    with torch.no_grad():
        assert relative(reloaded(**inputs, use_cache=False).logits, tuned) < 1e-6
        assert relative(merged(**inputs, use_cache=False).logits, tuned) < 1e-5
