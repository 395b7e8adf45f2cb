"""Vamba: Qwen2-VL whose visual tokens skip self-attention.

Text tokens run through decoder layers of self-attention + cross-attention + MLP; visual tokens (the Qwen2-VL
vision tower's output) run through one Mamba-2 block per layer and are read by the text as cross-attention keys
and values. Reading order follows the paper's figure: vision tower -> Mamba-2 -> decoder layer -> model ->
generation.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, eager_attention_forward
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed, PatchMerger, VisionMlp
from transformers.utils import logging

from .configuration_vamba import VambaConfig, VambaMambaConfig, VambaVisionConfig

try:
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as _kernel_rmsnorm
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as _kernel_gated_rmsnorm
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel_chunk_scan
except Exception as error:  # a missing, broken or CPU-only install must never break the import
    _kernel_chunk_scan = _kernel_gated_rmsnorm = _kernel_rmsnorm = None
    _MAMBA_SSM_ERROR = f"{type(error).__name__}: {error}"
else:
    _MAMBA_SSM_ERROR = None

try:
    from causal_conv1d import causal_conv1d_fn as _kernel_causal_conv1d
except Exception as error:
    _kernel_causal_conv1d = None
    _CAUSAL_CONV1D_ERROR = f"{type(error).__name__}: {error}"
else:
    _CAUSAL_CONV1D_ERROR = None

logger = logging.get_logger(__name__)

# The Triton/CUDA kernels index with 32-bit integers: no tensor they touch may reach 2**31 elements.
_KERNEL_MAX_ELEMENTS = 2**31 - 1

# transformers 5.24 renamed the cache argument of `forward` and the cache field of model outputs from
# `past_key_values` to `cache`; `generate` passes and reads it under the new name only.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_argument(past_key_values, cache):
    """The cache a forward was given, under either name (both at once is ambiguous)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("The cache was given twice, as `past_key_values` and as `cache`: pass it once (`cache` on "
                         "transformers >= 5.24, `past_key_values` before).")
    return cache if cache is not None else past_key_values


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., L, head_dim) in fp32 by angles given as cos/sin broadcastable to it."""
    # cos/sin are upcast here too: FSDP2 casts a wrapped layer's float inputs to bf16 in the forward pass but not
    # when activation checkpointing recomputes it, and the two must save tensors of one dtype.
    rotated = x.float() * cos.float() + rotate_half(x.float()) * sin.float()
    return rotated.to(x.dtype)


def sdpa_backends():
    """SDPA without cuDNN attention: torch 2.11 tries it first on Hopper, where it plans anew for every new key length
    (every decoding step) and ran 6-16x slower than flash on Vamba's cross-attention shapes (BENCHMARKS.md)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class FusedOnCuda:
    """`fn` compiled (torch.compile) for CUDA tensors, so that a chain of elementwise ops makes one pass over memory
    instead of one each; eager on other devices, or for good if compiling fails."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, x: torch.Tensor, *args):
        if x.is_cuda and not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(x, *args)
            except Exception as error:
                self.failed = True
                logger.warning(f"Vamba: torch.compile failed ({type(error).__name__}: {error}); running eager.")
        return self.fn(x, *args)


def attention_interface(implementation: str):
    if implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


# ---------------------------------------------------------------------------------------------------------------
# Vision tower: Qwen2-VL's ViT. Attention never crosses a temporal step, so all frames of one video (which share
# a size) attend as one batch, and a long video is encoded a group of frames at a time.
# ---------------------------------------------------------------------------------------------------------------


class VambaVisionRotary(nn.Module):
    """2-D rotary of the vision tower: half the rotary frequencies follow the patch row, half the column."""

    # Frequencies are computed on the fly (a few numbers): buffers would be lost to meta-device loading.
    def __init__(self, config: VambaVisionConfig, theta: float = 10000.0):
        super().__init__()
        self.dim = config.embed_dim // config.num_heads // 2
        self.merge = config.spatial_merge_size
        self.theta = theta

    def forward(self, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (height*width, head_dim) in the patch order of the processor (merge windows)."""
        m = self.merge
        rows = torch.arange(height, device=device)[:, None].expand(height, width)
        cols = torch.arange(width, device=device)[None, :].expand(height, width)

        def window_order(grid):
            return grid.reshape(height // m, m, width // m, m).permute(0, 2, 1, 3).reshape(-1)

        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
        angles = torch.cat([window_order(rows)[:, None] * inv_freq, window_order(cols)[:, None] * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


# The vision tower's rotary runs in fp32 over every patch of every block: fused, it is one pass instead of eight.
fused_rotary = FusedOnCuda(apply_rotary)


class VambaVisionAttention(nn.Module):
    def __init__(self, config: VambaVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1
        self.is_causal = False
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, frames: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """frames: (F, L, embed_dim), one row per temporal step; attention stays within a row."""
        num_frames, length, dim = frames.shape
        qkv = self.qkv(frames).view(num_frames, length, 3, self.num_heads, self.head_dim)
        # Rotated before the heads are moved forward: the fused pass then reads and writes whole rows. cos/sin are
        # upcast before the compiled pass, which saves its inputs as it gets them (see apply_rotary for why they may
        # come as bf16).
        cos, sin = (t.float()[:, None, None] for t in rotary)
        query, key = fused_rotary(qkv[:, :, :2], cos, sin).permute(2, 0, 3, 1, 4).unbind(0)
        with sdpa_backends():
            out, _ = attention_interface(self.config._attn_implementation or "sdpa")(
                self, query, key, qkv[:, :, 2].transpose(1, 2), None, scaling=self.scaling, dropout=0.0,
                is_causal=False,
            )
        return self.proj(out.reshape(num_frames, length, dim))


class VambaVisionBlock(GradientCheckpointingLayer):
    def __init__(self, config: VambaVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VambaVisionAttention(config)
        self.mlp = VisionMlp(config.embed_dim, int(config.embed_dim * config.mlp_ratio), config.hidden_act)

    def forward(self, frames: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        frames = frames + self.attn(self.norm1(frames), rotary)
        return frames + self.mlp(self.norm2(frames))


class VambaVisionTower(nn.Module):
    """Patch embedding -> ViT blocks -> 2x2 patch merger: one visual token per 2x28x28 pixel tube."""

    def __init__(self, config: VambaVisionConfig, max_frames: int):
        super().__init__()
        self.config = config
        self.max_frames = max_frames
        self.patch_embed = PatchEmbed(
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            in_channels=config.in_channels,
            embed_dim=config.embed_dim,
        )
        self.rotary = VambaVisionRotary(config)
        self.blocks = nn.ModuleList([VambaVisionBlock(config) for _ in range(config.depth)])
        self.merger = PatchMerger(
            dim=config.hidden_size, context_dim=config.embed_dim, spatial_merge_size=config.spatial_merge_size
        )

    def encode_frames(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """patches: (F*height*width, C*T*P*P) of F temporal steps -> (F*height*width/merge^2, hidden_size)."""
        frames = self.patch_embed(patches).view(-1, height * width, self.config.embed_dim)
        rotary = self.rotary(height, width, frames.device)
        for block in self.blocks:
            frames = block(frames, rotary)
        return self.merger(frames.reshape(-1, self.config.embed_dim))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """One (tokens, hidden_size) tensor per image/video of `grid_thw`."""
        outputs = []
        patches_per_item = grid_thw.prod(-1).tolist()
        for patches, (t, h, w) in zip(pixel_values.split(patches_per_item), grid_thw.tolist()):
            per_frame = h * w
            groups = [
                self.encode_frames(patches[start * per_frame : (start + self.max_frames) * per_frame], h, w)
                for start in range(0, t, self.max_frames)
            ]
            outputs.append(torch.cat(groups) if len(groups) > 1 else groups[0])
        return outputs


# ---------------------------------------------------------------------------------------------------------------
# Mamba-2 over the visual stream. Two implementations of one function: a chunked PyTorch scan (any device, any
# dtype) and mamba-ssm's Triton kernels with causal-conv1d (CUDA). Long streams are scanned in segments that
# carry the convolution and SSM states across, so no kernel sees more than 2**31 elements.
# ---------------------------------------------------------------------------------------------------------------


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L) with [i, j] = sum(x[j+1..i]) for j <= i and -inf above the diagonal."""
    length = x.shape[-1]
    cumsum = torch.cumsum(x, dim=-1)
    sums = cumsum[..., :, None] - cumsum[..., None, :]
    lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def ssd_scan_torch(x, dt, A, B, C, chunk_size, initial_state=None, seq_idx=None):
    """The Mamba-2 state-space recurrence S_t = exp(dt_t*A) S_{t-1} + dt_t B_t x_t^T, y_t = C_t S_t, computed in
    chunks (the SSD form: quadratic inside a chunk, recurrent across chunks), in fp32.

    x (b, l, h, p), dt (b, l, h) already softplus'ed, A (h,), B and C (b, l, g, n), initial_state (b, h, p, n),
    seq_idx (b, l) non-decreasing ints: the state resets where it changes; `initial_state` belongs to seq id 0.
    Returns y (b, l, h, p) and the final state (b, h, p, n).
    """
    batch, length, heads, _ = x.shape
    groups, state_dim = B.shape[-2:]
    pad = (-length) % chunk_size
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    if seq_idx is not None:
        seq_idx = F.pad(seq_idx, (0, pad), value=int(seq_idx.max()))
    chunks = (length + pad) // chunk_size

    def to_chunks(t):
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    B = to_chunks(B).repeat_interleave(heads // groups, dim=3)  # (b, c, L, h, n)
    C = to_chunks(C).repeat_interleave(heads // groups, dim=3)
    x_dt = to_chunks(x * dt[..., None])  # (b, c, L, h, p)
    a_dt = to_chunks(dt * A.float()).permute(0, 3, 1, 2)  # (b, h, c, L)
    a_cumsum = torch.cumsum(a_dt, dim=-1)

    decay = torch.exp(segment_sum(a_dt))  # (b, h, c, L, L)
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, L)
    decay_from_start = torch.exp(a_cumsum)
    if seq_idx is not None:
        ids = to_chunks(seq_idx)  # (b, c, L)
        decay = decay * (ids[:, None, :, :, None] == ids[:, None, :, None, :])
        decay_to_end = decay_to_end * (ids == ids[..., -1:])[:, None]
        chunk_first_id = torch.cat([torch.zeros_like(ids[:, :1, -1]), ids[:, :-1, -1]], dim=1)  # id carried in
        decay_from_start = decay_from_start * (ids == chunk_first_id[..., None])[:, None]
        carry_kept = chunk_first_id == ids[..., -1]  # (b, c): the carried state survives the whole chunk

    y_inside = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x_dt)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x_dt)

    state = x.new_zeros(batch, heads, x.shape[-1], state_dim) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cumsum[..., -1])  # (b, h, c)
    states_in = []
    for c in range(chunks):
        states_in.append(state)
        carried = state * chunk_decay[:, :, c, None, None]
        if seq_idx is not None:
            carried = carried * carry_kept[:, c, None, None, None]
        state = carried + chunk_states[:, c]
    states_in = torch.stack(states_in, dim=1)  # (b, c, h, p, n)
    y_carried = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states_in, decay_from_start)

    y = (y_inside + y_carried).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    return y, state


def causal_conv_torch(x: torch.Tensor, weight: torch.Tensor, bias, seq_idx=None) -> torch.Tensor:
    """Depthwise causal conv over time with SiLU. x (b, l, d), weight (d, k); taps never cross a seq_idx change."""
    width = weight.shape[-1]
    padded = F.pad(x, (0, 0, width - 1, 0))
    out = torch.zeros_like(x, dtype=torch.float) if bias is None else bias.float().expand_as(x).clone()
    for tap in range(width):
        shift = width - 1 - tap  # this tap reads `shift` steps back
        term = padded[:, tap : tap + x.shape[1]].float() * weight[:, tap].float()
        if seq_idx is not None and shift:
            same = F.pad(seq_idx, (shift, 0), value=-1)[:, : x.shape[1]] == seq_idx
            term = term * same[..., None]
        out = out + term
    return F.silu(out).to(x.dtype)


def kernels_unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"tensors are on {device.type}"
    if _MAMBA_SSM_ERROR:
        return f"mamba-ssm is not usable ({_MAMBA_SSM_ERROR})"
    if _CAUSAL_CONV1D_ERROR:
        return f"causal-conv1d is not usable ({_CAUSAL_CONV1D_ERROR})"
    return None


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) taken per group of channels (mamba-ssm's RMSNormGated with norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, use_kernel: bool = False) -> torch.Tensor:
        if use_kernel:
            return _kernel_gated_rmsnorm(y, self.weight, None, z=z, eps=self.eps, group_size=self.group_size,
                                         norm_before_gate=False)
        gated = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(y.dtype)


@dataclass
class MambaCarry:
    """What one segment of the visual stream hands to the next: the SSM state, the last d_conv-1 inputs of the
    convolution, and (packed rows) their sequence ids."""

    state: torch.Tensor
    conv_inputs: torch.Tensor
    conv_ids: Optional[torch.Tensor]


class Mamba2(nn.Module):
    """Mamba-2 mixer (parameter names as mamba-ssm's `Mamba2`): in_proj -> causal conv -> SSD scan -> gated
    RMSNorm -> out_proj."""

    def __init__(self, config: VambaMambaConfig, max_tokens: int):
        super().__init__()
        self.config = config
        self.max_tokens = max_tokens
        self.d_inner, self.nheads = config.d_inner, config.nheads
        self.bc_dim = config.ngroups * config.d_state
        conv_dim = self.d_inner + 2 * self.bc_dim
        self.in_proj = nn.Linear(config.hidden_dim, 2 * self.d_inner + 2 * self.bc_dim + self.nheads, bias=config.bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.d_conv, groups=conv_dim, padding=config.d_conv - 1,
                                bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.d_inner if config.D_has_hdim else self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // config.ngroups)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_dim, bias=config.bias)
        self.use_kernels = True  # False forces the PyTorch path (e.g. to compare the two)

    def backend(self, device: torch.device) -> str:
        return "mamba-ssm" if self.use_kernels and kernels_unavailable_reason(device) is None else "torch"

    def segment_length(self, batch: int) -> int:
        """Tokens per segment: at most `max_tokens`, and few enough that in_proj's output stays under 2**31."""
        limit = min(self.max_tokens, _KERNEL_MAX_ELEMENTS // (self.in_proj.out_features * batch))
        return max(self.config.chunk_size, limit - limit % self.config.chunk_size)

    def forward(self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u (b, l, hidden_dim) -> (b, l, hidden_dim), causal along l. seq_idx (b, l): packed rows, the state resets
        where it changes."""
        outputs = [out for _, out in self.segments(u, seq_idx)]
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def segments(self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None, norm: Optional[nn.Module] = None):
        """Yield (start, output) for each segment of u in order, the state carried across. `norm` is applied to each
        segment's input, so that no normalised copy of the whole stream is ever held."""
        use_kernels = self.backend(u.device) == "mamba-ssm"
        step = self.segment_length(u.shape[0])
        carry = None
        for start in range(0, u.shape[1], step):
            part = u[:, start : start + step]
            ids = None if seq_idx is None else seq_idx[:, start : start + step]
            out, carry = self.mix(self.in_proj(part if norm is None else norm(part)), ids, carry, use_kernels)
            yield start, out

    def mix(self, zxbcdt, seq_idx, carry: Optional[MambaCarry], use_kernels: bool):
        cfg = self.config
        z, xbc, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * self.bc_dim, self.nheads], dim=-1)
        tail = cfg.d_conv - 1
        next_conv_inputs, next_conv_ids = xbc[:, -tail:], None if seq_idx is None else seq_idx[:, -tail:]
        conv_ids = seq_idx
        if carry is not None and use_kernels and seq_idx is None:  # the kernel takes them as its initial state
            xbc = self.conv(xbc, None, use_kernels, carry.conv_inputs)
        else:
            if carry is not None:  # the convolution reads the last d_conv-1 inputs of the previous segment
                xbc = torch.cat([carry.conv_inputs, xbc], dim=1)
                conv_ids = None if seq_idx is None else torch.cat([carry.conv_ids, seq_idx], dim=1)
            xbc = self.conv(xbc, conv_ids, use_kernels)[:, xbc.shape[1] - zxbcdt.shape[1] :]

        x, B, C = xbc.split([self.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        batch, length = x.shape[:2]
        x = x.reshape(batch, length, self.nheads, cfg.headdim)
        B = B.reshape(batch, length, cfg.ngroups, cfg.d_state)
        C = C.reshape(batch, length, cfg.ngroups, cfg.d_state)
        state = None if carry is None else carry.state
        scan_ids = None
        if seq_idx is not None:  # id 0 marks the sequence that the carried state belongs to
            previous = carry.conv_ids[:, -1:] if carry is not None else seq_idx[:, :1]
            scan_ids = (seq_idx - previous).to(torch.int32).contiguous()
        y, state = self.scan(x, dt, B, C, state, scan_ids, use_kernels)
        y = self.norm(y.reshape(batch, length, self.d_inner), z, use_kernels)
        return self.out_proj(y.to(self.out_proj.weight.dtype)), MambaCarry(state, next_conv_inputs, next_conv_ids)

    def conv(self, xbc, seq_idx, use_kernels, initial_inputs=None):
        weight = self.conv1d.weight.squeeze(1)
        if use_kernels:
            ids = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
            initial = None if initial_inputs is None else initial_inputs.contiguous().transpose(1, 2)
            out = _kernel_causal_conv1d(xbc.transpose(1, 2), weight, self.conv1d.bias, seq_idx=ids,
                                        initial_states=initial, activation="silu")
            return out.transpose(1, 2)
        return causal_conv_torch(xbc, weight, self.conv1d.bias, seq_idx)

    def scan(self, x, dt, B, C, state, seq_idx, use_kernels):
        cfg = self.config
        A = -torch.exp(self.A_log.float())
        D = self.D.view(self.nheads, cfg.headdim) if cfg.D_has_hdim else self.D
        if use_kernels:
            return _kernel_chunk_scan(x, dt, A, B, C, cfg.chunk_size, D=D, dt_bias=self.dt_bias, dt_softplus=True,
                                      dt_limit=cfg.dt_limit, initial_states=state, seq_idx=seq_idx,
                                      return_final_states=True)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if cfg.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*cfg.dt_limit)
        y, state = ssd_scan_torch(x, dt, A, B, C, cfg.chunk_size, state, seq_idx)
        skip = D.float()[:, None] if D.dim() == 1 else D.float()
        return (y + x.float() * skip).to(x.dtype), state


class VambaVisionMixer(nn.Module):
    """The visual stream's block in each layer: v + Mamba2(RMSNorm(v))."""

    def __init__(self, config: VambaConfig):
        super().__init__()
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=1e-5)
        self.mixer = Mamba2(config.vision_mamba_mixer_config, config.mamba_max_tokens)

    def forward(self, visual: torch.Tensor, seq_idx: Optional[torch.Tensor] = None, in_place: bool = False):
        """`in_place` adds the output into `visual` segment by segment (each segment's output needs only its own
        input and the carried state), so that a second stream of visual length is never held."""
        if not in_place:
            return visual + self.mixer(self.norm(visual), seq_idx)
        for start, mixed in self.mixer.segments(visual, seq_idx, self.segment_norm(visual.device)):
            visual[:, start : start + mixed.shape[1]] += mixed
        return visual

    def segment_norm(self, device: torch.device):
        """The RMSNorm, as one fused kernel pass where the CUDA kernels run (the eager one makes several passes in
        fp32 over the visual stream, in every layer). Equal up to bf16 rounding."""
        if self.mixer.backend(device) != "mamba-ssm":
            return self.norm
        return lambda x: _kernel_rmsnorm(x, self.norm.weight, None, eps=self.norm.variance_epsilon)


# ---------------------------------------------------------------------------------------------------------------
# Decoder layer: causal self-attention over text, cross-attention from text to the visual stream, MLP on text,
# and Mamba-2 on the visual stream.
# ---------------------------------------------------------------------------------------------------------------


class MultimodalRotary(nn.Module):
    """M-RoPE of Qwen2-VL: the rotary frequencies are split in (t, h, w) sections, each turned by its own
    position row. Text tokens carry the same index in all three rows."""

    def __init__(self, config: VambaConfig):
        super().__init__()
        self.head_dim, self.theta, self.sections = config.head_dim, config.rope_theta, list(config.mrope_section)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (b, l) for text or (3, b, l) for (t, h, w) -> cos, sin of shape (b, 1, l, head_dim)."""
        device = positions.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if positions.dim() == 2:
            angles = positions[..., None].float() * inv_freq
        else:
            per_section = positions[..., None].float() * inv_freq  # (3, b, l, head_dim/2)
            angles = torch.cat([part[i] for i, part in enumerate(per_section.split(self.sections, dim=-1))], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()


class VambaAttention(nn.Module):
    """GQA attention; `is_cross` selects text->visual cross-attention (no causal mask) over self-attention."""

    def __init__(self, config: VambaConfig, layer_idx: int, is_cross: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = not is_cross
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return proj(x).view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def queries(self, x: torch.Tensor, rotary=None) -> torch.Tensor:
        q = self._heads(x, self.q_proj)
        return q if rotary is None else apply_rotary(q, *rotary)

    def keys_values(self, x: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(x, self.k_proj), self._heads(x, self.v_proj)
        return (k if rotary is None else apply_rotary(k, *rotary)), v

    def attend(self, q, k, v, mask, implementation: str) -> torch.Tensor:
        dropout = self.config.attention_dropout if self.training else 0.0
        # A per-query mask (packed rows) cannot follow the folded queries of cross_sdpa.
        if not self.is_causal and implementation == "sdpa" and (mask is None or mask.shape[-2] == 1):
            out = self.cross_sdpa(q, k, v, mask, dropout)
        else:
            # flash-attn takes a (b, k) padding mask together with its own causal flag; the others take one or the other.
            causal = self.is_causal and q.shape[2] > 1 and (mask is None or implementation.startswith("flash"))
            with sdpa_backends():
                out, _ = attention_interface(implementation)(
                    self, q, k, v, mask, scaling=self.scaling, dropout=dropout, is_causal=causal
                )
        return self.o_proj(out.reshape(*out.shape[:2], -1))

    def cross_sdpa(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        """Cross-attention through one SDPA call on the stored K/V heads, never repeated to num_heads (which would
        move num_key_value_groups times the visual K/V bytes, at every decoding step). With no causal mask, the
        query heads that share a K/V head are just more queries: (b, h, T, d) -> (b, h_kv, groups*T, d).
        Returns (b, T, h, d)."""
        batch, heads, length, dim = q.shape
        folded = q.reshape(batch, self.num_kv_heads, self.num_key_value_groups * length, dim)
        with sdpa_backends():
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling)
        return out.reshape(batch, heads, length, dim).transpose(1, 2)


class VambaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: VambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = VambaAttention(config, layer_idx, is_cross=False)
        self.cross_attn = VambaAttention(config, layer_idx, is_cross=True)
        if config.use_alpha_balancing:
            self.alpha = nn.Parameter(torch.empty(1))
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)
        if config.vision_mamba_mixer_config.enable:
            self.vision_mixer = VambaVisionMixer(config)

    def forward(
        self,
        text: torch.Tensor,
        visual: Optional[torch.Tensor],
        text_rotary: tuple[torch.Tensor, torch.Tensor],
        self_mask: Optional[torch.Tensor],
        cross: "CrossAttentionInputs",
        past_key_values: Optional["VambaCache"] = None,
        update_visual: bool = True,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cache = past_key_values
        implementation = self.config._attn_implementation or "sdpa"
        x = self.input_layernorm(text)

        q = self.self_attn.queries(x, text_rotary)
        k, v = self.self_attn.keys_values(x, text_rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attended = self.self_attn.attend(q, k, v, self_mask, implementation)

        if visual is not None and self.config.cross_attn_use_layer_norm:
            visual = self.input_layernorm(visual)
        cross_kv = self.cross_kv(visual, cross, cache)
        if cross_kv is not None:
            q = self.cross_attn.queries(x, cross.text_rotary)
            read = self.cross_attn.attend(q, *cross_kv, cross.mask, cross.implementation(implementation))
            if self.config.use_alpha_balancing:
                alpha = self.alpha.clamp(0, 1).to(read.dtype)
                mixed = alpha * attended + (1 - alpha) * read
            else:
                mixed = attended + read
            # Rows without visual input take the text-only path, exactly as when they run alone.
            attended = mixed if cross.has_visual is None else torch.where(cross.has_visual, mixed, attended)
        text = text + attended

        if not update_visual:
            visual = None  # the last layer: no later layer reads the stream
        elif visual is not None and self.config.vision_mamba_mixer_config.enable:
            # Without autograd the stream (the model's own copy, see _visual_stream) is updated in place; never in
            # training, where a reentrant checkpoint runs this forward without grad and must keep its saved input.
            in_place = not torch.is_grad_enabled() and not self.training
            visual = self.vision_mixer(visual, cross.seq_idx, in_place=in_place)
        text = text + self.mlp(self.post_attention_layernorm(text))
        return text, visual

    def cross_kv(self, visual, cross, cache):
        """This layer's cross-attention keys/values: projected from the visual stream entering the layer, or read
        from the cache while decoding."""
        if visual is None:
            return None if cache is None else cache.read_cross_kv(self.layer_idx)
        cross_kv = self.cross_attn.keys_values(visual, cross.visual_rotary)
        if cache is not None:
            cache.store_cross_kv(self.layer_idx, *cross_kv, self.config.cross_kv_cache_dtype)
        return cross_kv


# ---------------------------------------------------------------------------------------------------------------
# Cache: the text's self-attention KV (a DynamicCache) plus each layer's cross-attention K/V, computed once at
# prefill. Decoding touches no visual state but these.
# ---------------------------------------------------------------------------------------------------------------


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, h, n, d) -> x in `dtype` (a float8 type) and the scale (b, h, n, 1), in x's dtype, that restores it. One
    scale per token and head: a scale shared along the tokens lets one outlier token flush all others to zero."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = (amax / torch.finfo(dtype).max).to(x.dtype)
    return (x / scale).to(dtype), scale


class VambaCache(DynamicCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross_kv_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # only for 8-bit K/V
        self.cross_mask: Optional[torch.Tensor] = None
        self.cross_has_visual: Optional[torch.Tensor] = None
        self.decode_graph: Optional["DecodeGraph"] = None  # while set, it holds the self-attention K/V

    @property
    def has_visual(self) -> bool:
        return bool(self.cross_kv)

    def self_attention_length(self) -> int:
        return super().get_seq_length()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decode_graph.length if self.decode_graph is not None else super().get_seq_length(layer_idx)

    def decode_graph_for(self, model, batch_size: int) -> "DecodeGraph":
        if self.decode_graph is not None and not self.decode_graph.fits(batch_size):
            self.release_decode_graph()
        if self.decode_graph is None:
            self.decode_graph = DecodeGraph(model, self, batch_size)
        return self.decode_graph

    def release_decode_graph(self):
        """Back to the plain cache (before any step the graph does not cover: a prompt, a crop, a new batch)."""
        if self.decode_graph is not None:
            self.decode_graph.release(self)
            self.decode_graph = None

    def store_cross_kv(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, storage: Optional[str] = None):
        """Keep one layer's cross-attention K/V for decoding, in `storage` (a torch dtype name; None keeps them as
        they are). A float8 storage keeps one scale per (row, head, token)."""
        dtype = key.dtype if storage is None else getattr(torch, storage)
        if dtype.itemsize >= key.dtype.itemsize:
            self.cross_kv[layer_idx] = (key.to(dtype), value.to(dtype))
            return
        (key, key_scale), (value, value_scale) = quantize_per_token(key, dtype), quantize_per_token(value, dtype)
        self.cross_kv[layer_idx] = (key, value)
        self.cross_kv_scales[layer_idx] = (key_scale, value_scale)

    def read_cross_kv(self, layer_idx: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        cross_kv, scales = self.cross_kv.get(layer_idx), self.cross_kv_scales.get(layer_idx)
        if cross_kv is None or scales is None:
            return cross_kv
        return tuple(x.to(scale.dtype) * scale for x, scale in zip(cross_kv, scales))

    def _map_cross(self, fn):
        self.cross_kv = {i: (fn(k), fn(v)) for i, (k, v) in self.cross_kv.items()}
        self.cross_kv_scales = {i: (fn(k), fn(v)) for i, (k, v) in self.cross_kv_scales.items()}
        self.cross_mask = None if self.cross_mask is None else fn(self.cross_mask)
        self.cross_has_visual = None if self.cross_has_visual is None else fn(self.cross_has_visual)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self.decode_graph is not None:
            self.decode_graph.reorder(beam_idx)
        else:
            super().reorder_cache(beam_idx)
        self._map_cross(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        self.release_decode_graph()
        super().batch_repeat_interleave(repeats)
        self._map_cross(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self.release_decode_graph()
        super().batch_select_indices(indices)
        self._map_cross(lambda t: t[indices])

    def crop(self, max_length: int):
        self.release_decode_graph()
        super().crop(max_length)


class DecodeGraph:
    """One decoding step of the text stream (one new token per row) captured as a CUDA graph and replayed at every
    step. Eagerly, a step is ~60 small kernels per layer whose launches cost the CPU more time than their work
    costs the GPU (BENCHMARKS.md); replayed, the GPU runs them back to back.

    Inside the step, `StaticStepKV` stands in for the cache: the decoder layers' `update` writes the step's
    self-attention K/V into preallocated buffers at the step's position (static shapes, as a graph needs), and
    `read_cross_kv` reads the cache's cross-attention K/V. `release` hands the K/V back to the cache. The cache owns
    its graph and the graph keeps no reference to the cache, so a finished generation's memory (the cross K/V above
    all) is freed as soon as its cache is dropped. Off CUDA the same static step runs eagerly (that is how the CPU
    tests check it)."""

    headroom = 256  # decoding positions allocated beyond the prompt; the graph is rebuilt larger when they run out

    def __init__(self, model: "VambaForConditionalGeneration", cache: "VambaCache", batch_size: int):
        self.model = model
        self.length = cache.self_attention_length()
        self.capacity = -(-(self.length + self.headroom) // self.headroom) * self.headroom
        self.keys, self.values = [], []
        for layer in cache.layers:
            for stored, buffers in ((layer.keys, self.keys), (layer.values, self.values)):
                buffer = stored.new_zeros(*stored.shape[:2], self.capacity, stored.shape[-1])
                buffer[:, :, : self.length] = stored
                buffers.append(buffer)
        device = self.keys[0].device
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.keep = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.logits = None, None

    def fits(self, batch_size: int) -> bool:
        return self.input_ids.shape[0] == batch_size and self.length < self.capacity

    def step(self, cache: "VambaCache", input_ids, position_ids, attention_mask) -> torch.Tensor:
        """The next-token logits (b, 1, vocab) of `input_ids` (b, 1); `attention_mask` (b, length + 1) or None."""
        self.input_ids.copy_(input_ids)
        self.positions.copy_(position_ids)
        if attention_mask is None:
            self.keep[:, : self.length + 1] = True
        else:
            self.keep[:, : attention_mask.shape[1]].copy_(attention_mask.bool())
        self.index.fill_(self.length)
        if self.input_ids.is_cuda:
            if self.graph is None:
                self._capture(cache)
            self.graph.replay()
        else:
            self.logits = self._run(cache)
        self.length += 1
        return self.logits.clone()  # the graph overwrites its output at the next replay

    def _run(self, cache: "VambaCache") -> torch.Tensor:
        cross = CrossAttentionInputs(mask=cache.cross_mask, has_visual=cache.cross_has_visual,
                                     padded=cache.cross_mask is not None)
        kv = StaticStepKV(self, cache)
        return self.model.decode_step(self.input_ids, self.positions, self.keep[:, None, None, :], cross, kv)

    def _capture(self, cache: "VambaCache"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: allocator and kernel selection settle first
            self._run(cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run(cache)

    def reorder(self, beam_idx: torch.LongTensor):
        for buffer in (*self.keys, *self.values, self.keep):  # in place: the graph reads these addresses
            buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def release(self, cache: "VambaCache"):
        for layer, key, value in zip(cache.layers, self.keys, self.values):
            layer.keys, layer.values = key[:, :, : self.length].clone(), value[:, :, : self.length].clone()


@dataclass
class StaticStepKV:
    """The cache as the decoder layers see it during a DecodeGraph step."""

    graph: DecodeGraph
    cache: "VambaCache"

    def update(self, key, value, layer_idx: int):
        keys, values = self.graph.keys[layer_idx], self.graph.values[layer_idx]
        keys.index_copy_(2, self.graph.index, key)
        values.index_copy_(2, self.graph.index, value)
        return keys, values

    def read_cross_kv(self, layer_idx: int):
        return self.cache.read_cross_kv(layer_idx)


@dataclass
class CrossAttentionInputs:
    """What every layer's cross-attention needs besides its own weights (the same for all layers)."""

    mask: Optional[torch.Tensor] = None  # in the attention implementation's format; None attends everywhere
    # (b, 1, 1) bool, or (b, T, 1) for packed rows: when some rows (segments) of the batch have no visual input
    has_visual: Optional[torch.Tensor] = None
    text_rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    visual_rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    seq_idx: Optional[torch.Tensor] = None  # packed rows: which video each visual token belongs to
    padded: bool = False

    def to(self, device) -> "CrossAttentionInputs":
        """Moved by accelerate's hooks when the layers of a `device_map` sit on several devices."""

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            return tuple(move(v) for v in value) if isinstance(value, tuple) else value

        return CrossAttentionInputs(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def implementation(self, configured: str) -> str:
        # flash-attn's varlen path cannot mask keys of another length than the queries: SDPA handles padding.
        return "sdpa" if self.padded and configured.startswith("flash") else configured


def attention_mask_for(keep: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(b, q, k) bool of allowed pairs -> the mask format of the attention implementation, (b, 1, q, k)."""
    keep = keep | ~keep.any(-1, keepdim=True)  # a fully masked row (left padding) attends everywhere, harmlessly
    keep = keep[:, None]
    if implementation == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class VambaPreTrainedModel(PreTrainedModel):
    config_class = VambaConfig
    config: VambaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VambaDecoderLayer", "VambaVisionBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_attention_backend = True
    _keep_in_fp32_modules = []

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range

        def fill(param, fn, *args, **kwargs):
            # Loaded weights are never touched (transformers 5 flags them on the tensor).
            if param is not None and not getattr(param, "_is_hf_initialized", False):
                fn(param, *args, **kwargs)

        if isinstance(module, (nn.Linear, nn.Conv3d)):
            fill(module.weight, nn.init.normal_, std=std)
            fill(module.bias, nn.init.zeros_)
        elif isinstance(module, nn.Embedding):
            fill(module.weight, nn.init.normal_, std=std)
        elif isinstance(module, (nn.LayerNorm, Qwen2RMSNorm)):
            fill(module.weight, nn.init.ones_)
            fill(getattr(module, "bias", None), nn.init.zeros_)
        elif isinstance(module, Mamba2):
            self._init_mamba(module, fill)
        elif isinstance(module, VambaDecoderLayer) and hasattr(module, "alpha"):
            fill(module.alpha, nn.init.constant_, 0.5)

    @staticmethod
    def _init_mamba(module: Mamba2, fill):
        cfg = module.config
        fill(module.conv1d.weight, nn.init.kaiming_uniform_, a=math.sqrt(5))
        fill(module.conv1d.bias, nn.init.zeros_)
        fill(module.D, nn.init.ones_)
        fill(module.norm.weight, nn.init.ones_)
        # A = -exp(A_log) spread over A_init_range, dt initialised log-uniformly in [dt_min, dt_max].
        low, high = cfg.A_init_range
        fill(module.A_log, lambda p: p.copy_(torch.linspace(math.log(low), math.log(high), p.numel())))

        def dt_bias(p):
            dt = torch.exp(torch.linspace(math.log(cfg.dt_min), math.log(cfg.dt_max), p.numel()))
            dt = dt.clamp(min=cfg.dt_init_floor)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

        fill(module.dt_bias, dt_bias)

    @property
    def mamba_backend(self) -> str:
        """Which Mamba-2 implementation runs on the model's current device: "mamba-ssm" or "torch"."""
        mixers = [m for m in self.modules() if isinstance(m, Mamba2)]
        return mixers[0].backend(self.device) if mixers else "none"

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers 4.x and early 5.x

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
            """Checkpoint every decoder layer and vision block, non-reentrant by default as in later transformers
            (the reentrant default gives no gradient to a layer whose inputs need none: LoRA on frozen embeddings,
            or Mamba-2 blocks behind a frozen vision tower). Other arguments (the Trainer's `every_n_layers` in
            early 5.x) go to transformers unchanged."""
            gradient_checkpointing_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)


class VambaTextModel(nn.Module):
    """Token embedding, the decoder layers, and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: VambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([VambaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class VambaModel(VambaPreTrainedModel):
    """Vision tower + decoder, without the LM head. Returns the text's last hidden states."""

    def __init__(self, config: VambaConfig):
        super().__init__(config)
        self._build(config)
        self._warned_no_kernels = False
        self.post_init()

    def _build(self, config: VambaConfig):
        self.visual = VambaVisionTower(config.vision_config, config.vision_max_frames)
        self.model = VambaTextModel(config)
        self.rotary = MultimodalRotary(config)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def freeze_vision_tower(self, frozen: bool = True) -> "VambaModel":
        """Train without (frozen=True) or with the vision tower: sets requires_grad on its parameters. Returns the
        model. The Mamba-2 blocks of the visual stream belong to the decoder layers and stay trainable."""
        self.visual.requires_grad_(not frozen)
        return self

    # -- visual input -> one padded visual stream per row -------------------------------------------------------

    def encode_visual(self, pixel_values, grid_thw) -> list[torch.Tensor]:
        """The vision tower's output, one (tokens, hidden) tensor per image/video."""
        pixel_values = pixel_values.to(self.visual.patch_embed.proj.weight.dtype)
        return self.visual(pixel_values, grid_thw)

    def _visual_items(self, input_ids, batch_size, pixel_values, image_grid_thw, pixel_values_videos,
                      video_grid_thw, visual_embeds):
        if visual_embeds is not None:
            return list(visual_embeds), None
        given = [(name, pixels, grid) for name, pixels, grid in (
            ("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw)) if pixels is not None]
        for name, pixels, grid in given:
            if grid is None:
                raise ValueError(f"{name} pixels were given without `{name}_grid_thw`: pass the grid sizes the "
                                 f"processor returned alongside the pixels.")
            if int(grid.prod(-1).sum()) != pixels.shape[0]:
                raise ValueError(f"`{name}_grid_thw` describes {int(grid.prod(-1).sum())} patches but the {name} "
                                 f"pixels hold {pixels.shape[0]}: they must come from the same processor call.")
        if len(given) == 2:
            raise ValueError("One batch mixes images and videos: the prompts mark both with the same "
                             "<|vision_start|><|vision_end|> pair, so their rows are ambiguous. Run images and "
                             "videos in separate batches.")
        if not given:
            return [], None
        _, pixels, grid = given[0]
        return self.encode_visual(pixels, grid), grid

    def _rows_of_visual(self, input_ids, batch_size, num_items) -> list[int]:
        if input_ids is None:
            if num_items not in (0, batch_size):
                raise ValueError(f"{num_items} visual inputs for {batch_size} rows given as inputs_embeds: give "
                                 f"one visual input per row, or pass input_ids.")
            return list(range(num_items))
        per_row = (input_ids == self.config.vision_start_token_id).sum(-1).tolist()
        if max(per_row, default=0) > 1:
            raise ValueError("A prompt holds more than one <|vision_start|>: Vamba reads one image or video per "
                             "prompt. Split the conversation, or sample one video from the clips.")
        rows = [row for row, count in enumerate(per_row) if count]
        if len(rows) != num_items:
            raise ValueError(f"The prompts hold {len(rows)} <|vision_start|> placeholder(s) but {num_items} "
                             f"image(s)/video(s) were given: each visual input needs exactly one "
                             f"<|vision_start|><|vision_end|> in its prompt (the processor's chat template adds it).")
        return rows

    def _visual_stream(self, items, rows, batch_size, dtype, device):
        """Pad the items into a (b, n, d) stream; rows without visual input get an empty (masked) stream. The stream
        is always a new tensor: the decoder layers update it in place."""
        lengths = [0] * batch_size
        for row, item in zip(rows, items):
            lengths[row] = item.shape[0]
        longest = max(lengths)
        if all(n == longest for n in lengths):
            return torch.stack(items).to(dtype), None
        visual = torch.zeros(batch_size, longest, self.config.hidden_size, dtype=dtype, device=device)
        for row, item in zip(rows, items):
            visual[row, : item.shape[0]] = item
        keep = torch.arange(longest, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        return visual, keep

    def _visual_positions(self, grid, offsets, batch_size, longest, device):
        """(3, b, n) (t, h, w) positions of each merged visual token, from 0 in each item; padding gets 0. `offsets`
        holds each item's (row, first token) in the stream."""
        positions = torch.zeros(3, batch_size, longest, dtype=torch.long, device=device)
        merge = self.config.vision_config.spatial_merge_size
        for (row, offset), (t, h, w) in zip(offsets, grid.tolist()):
            h, w = h // merge, w // merge
            thw = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            positions[:, row, offset : offset + t * h * w] = thw.reshape(3, -1).to(device)
        return positions

    # -- packed rows: several (video, conversation) pairs in one row ---------------------------------------------

    @staticmethod
    def _packed_segments(position_ids, attention_mask, batch_size, past_key_values) -> Optional[torch.Tensor]:
        """(b, T) index of the packed segment of each text token (-1 before a row's first one), or None when no row
        is packed. A segment starts at each real token whose position id is 0 (transformers' padding-free
        convention); only a forward without a filled cache is checked."""
        if position_ids is None or position_ids.dim() != 2:
            return None
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            return None
        starts = (position_ids == 0).expand(batch_size, -1)
        if attention_mask is not None:
            starts = starts & attention_mask.bool()
        if int(starts.sum(-1).max()) < 2:
            return None
        return starts.long().cumsum(-1) - 1

    def _packed_placements(self, input_ids, segments, num_items) -> list[tuple[int, int]]:
        """(row, segment) of each visual input: the k-th input goes to the k-th <|vision_start|> in reading order."""
        if input_ids is None:
            if num_items:
                raise ValueError("Packed rows with visual inputs need input_ids: their <|vision_start|> tokens say "
                                 "which segment reads which video.")
            return []
        rows, columns = (input_ids == self.config.vision_start_token_id).nonzero(as_tuple=True)
        placements = list(zip(rows.tolist(), segments[rows, columns].tolist()))
        if len(set(placements)) != len(placements):
            raise ValueError("A packed segment holds more than one <|vision_start|>: each conversation of a packed "
                             "row reads one image or video.")
        if len(placements) != num_items:
            raise ValueError(f"The packed rows hold {len(placements)} <|vision_start|> placeholder(s) but {num_items} "
                             f"image(s)/video(s) were given: give the videos of each row in order, one per "
                             f"placeholder, rows one after the other.")
        return placements

    def _packed_visual_stream(self, items, placements, segments, dtype, device):
        """Each row's videos one after the other in a (b, n, d) stream. Also returns the (b, T, n) cross-attention
        keep mask (a text segment reads its own video only), the Mamba-2 `seq_idx` (b, n) (the video's index in its
        row; padding continues the last, the scan being causal) and each item's (row, first token)."""
        batch_size = segments.shape[0]
        offsets, row_lengths = [], [0] * batch_size
        for item, (row, _) in zip(items, placements):
            offsets.append((row, row_lengths[row]))
            row_lengths[row] += item.shape[0]
        longest = max(row_lengths)
        visual = torch.zeros(batch_size, longest, self.config.hidden_size, dtype=dtype, device=device)
        reader = torch.full((batch_size, longest), -1, dtype=torch.long, device=device)  # segment reading each token
        seq_idx = torch.zeros(batch_size, longest, dtype=torch.long, device=device)
        videos_in_row = [0] * batch_size
        for item, (row, segment), (_, offset) in zip(items, placements, offsets):
            end = offset + item.shape[0]
            visual[row, offset:end] = item
            reader[row, offset:end] = segment
            seq_idx[row, offset:] = videos_in_row[row]
            videos_in_row[row] += 1
        keep = (segments[:, :, None] == reader[:, None, :]) & (reader >= 0)[:, None, :]
        return visual, keep, seq_idx, offsets

    @staticmethod
    def _packed_self_mask(segments, attention_mask, dtype, implementation):
        """Causal self-attention inside each packed segment, to real tokens only."""
        length = segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
        keep = causal & (segments[:, :, None] == segments[:, None, :])
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, :]
        return attention_mask_for(keep, implementation, dtype)

    # -- text positions and masks -------------------------------------------------------------------------------

    @staticmethod
    def _text_positions(attention_mask, past_length, length, batch_size, device):
        if attention_mask is None:
            return torch.arange(past_length, past_length + length, device=device).expand(batch_size, -1)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -length:]

    def _self_mask(self, attention_mask, past_length, length, dtype, implementation):
        if attention_mask is not None and attention_mask.shape[-1] != past_length + length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds "
                             f"{past_length} and the input {length}: it must cover both.")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if implementation.startswith("flash"):
            return attention_mask if padded else None
        if not padded and (length == 1 or (past_length == 0 and implementation != "eager")):
            return None  # plain causal: SDPA's is_causal, or one query that sees everything
        device = attention_mask.device if attention_mask is not None else self.device
        query_pos = torch.arange(length, device=device)[:, None] + past_length
        keep = (torch.arange(past_length + length, device=device)[None] <= query_pos)[None]
        if padded:
            keep = keep & attention_mask.bool()[:, None, :]
        batch = attention_mask.shape[0] if attention_mask is not None else 1
        return attention_mask_for(keep.expand(batch, -1, -1), implementation, dtype)

    def _cross_inputs(self, visual, keep, text_positions, visual_positions, dtype, implementation, cache):
        """Cross-attention mask, rows with visual input, and rotary: computed at prefill, kept in the cache for
        decoding."""
        cross = CrossAttentionInputs()
        if visual is not None:
            if keep is not None:
                cross.padded = True
                mask_format = "sdpa" if implementation.startswith("flash") else implementation
                keep = keep[:, None, :] if keep.dim() == 2 else keep  # (b, n) for all queries, or (b, T, n)
                cross.mask = attention_mask_for(keep, mask_format, dtype)
                has_visual = keep.any(-1)
                if not bool(has_visual.all()):
                    cross.has_visual = has_visual[..., None]
            if cache is not None:
                cache.cross_mask, cache.cross_has_visual = cross.mask, cross.has_visual
        elif cache is not None and cache.has_visual:
            cross.mask, cross.has_visual = cache.cross_mask, cache.cross_has_visual
            cross.padded = cross.mask is not None
        if self.config.cross_attn_use_position_embeddings:
            cross.text_rotary = self.rotary(text_positions)
            if visual_positions is not None:
                cross.visual_rotary = self.rotary(visual_positions)
        return cross

    def _check_kernels(self, device):
        reason = kernels_unavailable_reason(device)
        if device.type == "cuda" and reason and not self._warned_no_kernels:
            self._warned_no_kernels = True
            logger.warning(f"Vamba: {reason}; running Mamba-2 with the PyTorch path (correct but slower). For the "
                           f"fast path install the CUDA kernels: pip install 'vamba-hf[cuda]' "
                           f"(mamba-ssm and causal-conv1d built for your torch and CUDA).")

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        cache: Optional[DynamicCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        visual_embeds: Optional[list[torch.Tensor]] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""Text `input_ids` (b, T) with `<|vision_start|><|vision_end|>` where each image or video goes, and the
        visual inputs in the order of those placeholders: `pixel_values_videos` + `video_grid_thw` (or the image
        pair) as the processor returns them, or `visual_embeds`, one (tokens, hidden) tensor per item.

        Packed rows (training): several (video, conversation) pairs in one row, computed exactly as if each pair ran
        alone. Mark where each pair starts by `position_ids` (b, T) restarting at 0, as transformers' padding-free
        collators do (`DataCollatorWithFlattening`); e.g. two pairs of 5 and 3 tokens: `[[0, 1, 2, 3, 4, 0, 1, 2]]`.
        A segment's text attends causally to itself only, reads only its own video in cross-attention, and its
        video's Mamba-2 state starts from zero. A row may hold several placeholders (one per segment); the visual
        inputs are the videos of row 0 in order, then those of row 1, and so on; segments without a placeholder are
        text-only. Rows may be padded at the end (with `attention_mask` 0 there). Packed forwards keep no cache and
        need `attn_implementation` "sdpa" or "eager".
        """
        past_key_values = cache_argument(past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        batch_size, length = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]} but the input has "
                             f"{batch_size}.")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else (
            self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and self.training and any(layer.gradient_checkpointing for layer in self.model.layers):
            # The checkpointed layers run twice: the second run would append to the cache again.
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing: running without cache.")
            use_cache = False
        implementation = self.config._attn_implementation or "sdpa"
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        segments = self._packed_segments(position_ids, attention_mask, batch_size, past_key_values)
        if segments is not None:
            if implementation.startswith("flash"):
                raise ValueError("Packed rows (position_ids restarting at 0) need attn_implementation='sdpa' or "
                                 "'eager'; flash-attention's variable-length path is not wired for them yet.")
            use_cache = False

        cache = None
        if use_cache:
            cache = past_key_values
            if not isinstance(cache, VambaCache):
                if cache is not None and cache.get_seq_length() > 0:
                    raise ValueError("past_key_values must be the VambaCache a previous call returned.")
                cache = VambaCache()
            cache.release_decode_graph()
        past_length = cache.get_seq_length() if cache is not None else 0

        items, grid = self._visual_items(input_ids, batch_size, pixel_values, image_grid_thw, pixel_values_videos,
                                         video_grid_thw, visual_embeds)
        if segments is None:
            rows = self._rows_of_visual(input_ids, batch_size, len(items))
        else:
            placements = self._packed_placements(input_ids, segments, len(items))
        visual = keep = visual_positions = visual_seq_idx = None
        if items:
            self._check_kernels(device)
            if segments is None:
                visual, keep = self._visual_stream(items, rows, batch_size, dtype, device)
                offsets = [(row, 0) for row in rows]
            else:
                visual, keep, visual_seq_idx, offsets = self._packed_visual_stream(items, placements, segments, dtype,
                                                                                    device)
            items.clear()  # the stream holds its own copy: free the vision tower's output early
            if self.config.cross_attn_use_position_embeddings:
                if grid is None:
                    raise ValueError("cross_attn_use_position_embeddings needs the visual grid: pass pixels with "
                                     "their grid_thw rather than visual_embeds.")
                visual_positions = self._visual_positions(grid, offsets, batch_size, visual.shape[1], device)

        if position_ids is None:
            position_ids = self._text_positions(attention_mask, past_length, length, batch_size, device)
        text_rotary = self.rotary(position_ids)
        if segments is None:
            self_mask = self._self_mask(attention_mask, past_length, length, dtype, implementation)
        else:
            self_mask = self._packed_self_mask(segments, attention_mask, dtype, implementation)
        cross = self._cross_inputs(visual, keep, position_ids, visual_positions, dtype, implementation, cache)
        cross.seq_idx = visual_seq_idx

        text = inputs_embeds
        hidden_states = [] if output_hidden_states else None
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            if output_hidden_states:
                hidden_states.append(text)
            # The last layer's Mamba-2 output would be read by no one.
            text, visual = layer(text, visual, text_rotary, self_mask, cross, past_key_values=cache,
                                 update_visual=i < last)
        text = self.model.norm(text)
        if output_hidden_states:
            hidden_states.append(text)

        return BaseModelOutputWithPast(
            last_hidden_state=text,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            **{CACHE_NAME: cache},
        )


class VambaForConditionalGeneration(VambaModel, GenerationMixin):
    """Vamba with its LM head: what `AutoModelForVision2Seq` / `AutoModelForImageTextToText` load."""

    _visual_input_names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "visual_embeds")

    def _build(self, config: VambaConfig):
        super()._build(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        cache: Optional[DynamicCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        visual_embeds: Optional[list[torch.Tensor]] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""VambaModel's inputs (packed rows included, see its forward), plus:

        labels (b, T): the token each position should be followed by is `labels[:, i + 1]`, as in every transformers
            causal LM (the model shifts them); -100 is ignored. The loss is a cross-entropy in fp32, averaged over the
            supervised tokens, or summed and divided by `num_items_in_batch` when the Trainer passes it (gradient
            accumulation). In a packed row a segment's last token is scored against the next segment's first label,
            which is -100 when each segment starts with its (unsupervised) prompt.
        logits_to_keep: an int k computes the logits of the last k positions only (0: all), a 1-D tensor those of the
            given positions; with `labels`, the loss covers the kept positions.
        """
        past_key_values = cache_argument(past_key_values, cache)
        if self._decodes_with_graph(input_ids, past_key_values, use_cache, (pixel_values, pixel_values_videos,
                                    visual_embeds), labels, output_hidden_states):
            if position_ids is None:
                position_ids = self._text_positions(attention_mask, past_key_values.get_seq_length(), 1,
                                                    input_ids.shape[0], input_ids.device)
            graph = past_key_values.decode_graph_for(self, input_ids.shape[0])
            logits = graph.step(past_key_values, input_ids, position_ids, attention_mask)
            return CausalLMOutputWithPast(logits=logits, **{CACHE_NAME: past_key_values})
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            visual_embeds=visual_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states, **kwargs,
        )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, kept]).float()
        loss = None
        if labels is not None:
            loss = self.next_token_loss(logits, labels, kept, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: getattr(outputs, CACHE_NAME)}
        )

    _graph_device_types = ("cuda",)

    def _decodes_with_graph(self, input_ids, cache, use_cache, visual_inputs, labels, output_hidden_states) -> bool:
        """A decoding step (one token per row after a prompt) that the CUDA graph can run."""
        return (
            self.config.decode_with_cuda_graph
            and input_ids is not None and input_ids.shape[1] == 1 and input_ids.device.type in self._graph_device_types
            and isinstance(cache, VambaCache) and cache.get_seq_length() > 0 and use_cache is not False
            and labels is None and not output_hidden_states and all(x is None for x in visual_inputs)
            and not torch.is_grad_enabled() and not self.training
            and (self.config._attn_implementation or "sdpa") == "sdpa"
            and len(set((getattr(self, "hf_device_map", None) or {"": 0}).values())) == 1
        )

    def decode_step(self, input_ids, position_ids, self_mask, cross: CrossAttentionInputs, kv) -> torch.Tensor:
        """The text stream's step for one new token per row, with every shape fixed (what DecodeGraph captures)."""
        text = self.model.embed_tokens(input_ids)
        rotary = self.rotary(position_ids)
        if self.config.cross_attn_use_position_embeddings:
            cross.text_rotary = rotary
        for layer in self.model.layers:
            text, _ = layer(text, None, rotary, self_mask, cross, past_key_values=kv)
        return self.lm_head(self.model.norm(text)).float()

    def next_token_loss(self, logits, labels, kept=slice(None), num_items_in_batch=None) -> torch.Tensor:
        """transformers' causal-LM loss on `logits` (b, k, V), the logits of positions `kept` of `labels` (b, T)."""
        next_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return self.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1],
                                  shift_labels=next_labels[:, kept].contiguous(), num_items_in_batch=num_items_in_batch)

    # -- generation ---------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        model_inputs.pop("cache_position", None)
        cache = model_inputs.get(CACHE_NAME)
        if isinstance(cache, VambaCache) and cache.get_seq_length() > 0:
            for name in self._visual_input_names:  # already encoded into the cached cross-attention K/V
                model_inputs.pop(name, None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        """Beam search / num_return_sequences repeat each row: repeat its visual input with it (pixel tensors are
        concatenated over items, not batched, so the generic row repeat would be wrong)."""
        if expand_size == 1:
            return input_ids, model_kwargs
        visual = {}
        for pixels_name, grid_name in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            pixels, grid = model_kwargs.pop(pixels_name, None), model_kwargs.pop(grid_name, None)
            if pixels is not None and grid is not None:
                per_item = pixels.split(grid.prod(-1).tolist())
                visual[pixels_name] = torch.cat([p for p in per_item for _ in range(expand_size)])
                visual[grid_name] = grid.repeat_interleave(expand_size, dim=0)
            elif pixels is not None or grid is not None:
                visual[pixels_name], visual[grid_name] = pixels, grid
        embeds = model_kwargs.pop("visual_embeds", None)
        if embeds is not None:
            visual["visual_embeds"] = [e for e in embeds for _ in range(expand_size)]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(visual)
        return input_ids, model_kwargs


VambaModel.register_for_auto_class("AutoModel")
VambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
