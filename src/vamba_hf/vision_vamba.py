"""The vision tower: Qwen2-VL's ViT, unchanged in its weights (`visual.*` of the checkpoint).

Patch embedding (a 3-D convolution over 2x14x14 pixel tubes) -> ViT blocks with 2-D rotary -> a 2x2 patch merger:
one visual token per 2x28x28 tube. Attention never crosses a temporal step, so all frames of one video (which share
a size) attend as one batch, and a long video is encoded a group of frames at a time.
"""

from dataclasses import dataclass, field
from itertools import groupby
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_vamba import VambaVisionConfig
from .layers_vamba import FusedOnCuda, apply_rotary, attention_interface, vision_sdpa_backends

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # optional: SDPA, or transformers' attention functions, otherwise
    flash_attn_varlen_func = None


class TubeConv3d(nn.Conv3d):
    """The patch embedding's Conv3d, applied to rows of flattened tubes of exactly its kernel's size. With kernel ==
    stride == input, each output is one dot product of a tube with each filter: one matrix product (rows, C*T*P*P)
    x (C*T*P*P, out), the same sum as the convolution's and many times faster than cuDNN's 3-D kernels on this
    shape. A subclass, so that the checkpoint key `proj.weight` and module hooks (offloading, adapters) apply."""

    def forward(self, tubes: torch.Tensor) -> torch.Tensor:
        """tubes: (rows, in_channels * prod(kernel_size)) -> (rows, out_channels)."""
        return F.linear(tubes, self.weight.reshape(self.out_channels, -1), self.bias)


class PatchEmbed(nn.Module):
    """Rows of flattened (C, T, P, P) pixel tubes -> (rows, embed_dim), through one strided Conv3d."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.in_channels, self.embed_dim = in_channels, embed_dim
        kernel = [temporal_patch_size, patch_size, patch_size]
        self.proj = TubeConv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        tube_size = self.in_channels * self.temporal_patch_size * self.patch_size**2
        return self.proj(patches.reshape(-1, tube_size).to(self.proj.weight.dtype))


class PatchMerger(nn.Module):
    """LayerNorm, then each window of merge x merge neighbouring patches concatenated and projected to `dim`."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2):
        super().__init__()
        self.hidden_size = context_dim * spatial_merge_size**2
        self.ln_q = nn.LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size), nn.GELU(),
                                 nn.Linear(self.hidden_size, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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
        # The rotary runs in fp32 over every patch of every block: fused on CUDA, it is one pass instead of eight.
        self.fused_rotary = FusedOnCuda(apply_rotary)

    def heads(self, frames: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """frames (F, L, embed_dim) -> rotated query, key and value (F, heads, L, head_dim): views of the (F, L, heads,
        head_dim) rows that the projection and the rotary write, the layout SDPA's kernels read without a copy."""
        num_frames, length, _ = frames.shape
        qkv = self.qkv(frames).view(num_frames, length, 3, self.num_heads, self.head_dim)
        # Rotated before the heads are moved forward: the fused pass then reads and writes whole rows.
        query, key = self.fused_rotary(qkv[:, :, :2], cos, sin).permute(2, 0, 3, 1, 4).unbind(0)
        return query, key, qkv[:, :, 2].transpose(1, 2)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               weights: Optional[list] = None) -> torch.Tensor:
        """Attention within each frame: (F, heads, L, head_dim) -> (F, L, embed_dim), before the output projection.
        With a `weights` list, attention runs eagerly and appends its (F, heads, L, L) weights to it."""
        num_frames, _, length, _ = query.shape
        implementation = "eager" if weights is not None else (self.config._attn_implementation or "sdpa")
        if implementation == "flash_attention_2" and flash_attn_varlen_func is not None:
            out = self.attend_varlen(query, key, value)
        elif implementation == "sdpa":
            with vision_sdpa_backends():
                out = F.scaled_dot_product_attention(query, key, value, scale=self.scaling).transpose(1, 2)
        else:
            out, attention = attention_interface(implementation)(self, query, key, value, None, scaling=self.scaling,
                                                                 dropout=0.0, is_causal=False)
            if weights is not None:
                weights.append(attention)
        return out.reshape(num_frames, length, -1)

    def attend_varlen(self, query, key, value) -> torch.Tensor:
        """flash-attn's variable-length kernel over the frames as sequences of one packed (F*L, heads, head_dim)
        batch: the rows as the projection wrote them. Returns (F, L, heads, head_dim)."""
        num_frames, heads, length, dim = query.shape
        starts = torch.arange(0, (num_frames + 1) * length, length, dtype=torch.int32, device=query.device)
        packed = [x.transpose(1, 2).reshape(num_frames * length, heads, dim) for x in (query, key, value)]
        out = flash_attn_varlen_func(*packed, starts, starts, length, length, dropout_p=0.0,
                                     softmax_scale=self.scaling, causal=False)
        return out.view(num_frames, length, heads, dim)

    def forward(self, frames: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """frames: (F, L, embed_dim), one row per temporal step; attention stays within a row."""
        return self.proj(self.attend(*self.heads(frames, *rotation(rotary))))


def rotation(rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) -> (L, 1, 1, head_dim) fp32, to broadcast over the (F, L, 2, heads, head_dim) q/k rows.
    Upcast before any compiled pass, which saves its inputs as it gets them (see apply_rotary for why they may come
    as bf16)."""
    return tuple(t.float()[:, None, None] for t in rotary)


class VambaVisionBlock(GradientCheckpointingLayer):
    def __init__(self, config: VambaVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = VambaVisionAttention(config)
        self.mlp = VisionMlp(config.embed_dim, int(config.embed_dim * config.mlp_ratio), config.hidden_act)
        # On CUDA at inference each side of the block's attention runs compiled: the LayerNorms, biases, fp32 rotary,
        # quick_gelu and residual adds fuse around the GEMMs. Static shapes: a video's frame groups share one shape
        # (the last group another), and static index arithmetic keeps the fused rotary at memory speed. Training and
        # other devices run the same methods eagerly (with the rotary alone fused on CUDA).
        self.compiled_attention_inputs = FusedOnCuda(VambaVisionBlock.attention_inputs, dynamic=False,
                                                     inference_only=True)
        self.compiled_block_output = FusedOnCuda(VambaVisionBlock.block_output, dynamic=False, inference_only=True)

    def attention_inputs(self, frames: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """LayerNorm -> qkv projection -> rotary: the block's work before attention."""
        return self.attn.heads(self.norm1(frames), cos, sin)

    def block_output(self, frames: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection and residual -> LayerNorm -> MLP (quick_gelu) and residual: the block's work after
        attention."""
        frames = frames + self.attn.proj(attended)
        return frames + self.mlp(self.norm2(frames))

    def forward(self, frames: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                weights: Optional[list] = None) -> torch.Tensor:
        query, key, value = self.compiled_attention_inputs(self, frames, *rotation(rotary))
        return self.compiled_block_output(self, frames, self.attn.attend(query, key, value, weights))


@dataclass
class TowerRecord:
    """What the tower keeps of an encoding when asked (`VambaVisionTower.forward(..., record=...)`), each list in
    the order of the pixel rows: the patch states before the merger, the states entering each block and leaving
    the last one (`hidden_states`), each block's attention weights (`attentions`, one (F, heads, L, L) tensor per
    group of frames). None: not kept."""

    last: list = field(default_factory=list)
    hidden_states: Optional[list[list[torch.Tensor]]] = None
    attentions: Optional[list[list[torch.Tensor]]] = None

    @classmethod
    def asking(cls, depth: int, hidden_states: bool, attentions: bool) -> "TowerRecord":
        return cls(hidden_states=[[] for _ in range(depth + 1)] if hidden_states else None,
                   attentions=[[] for _ in range(depth)] if attentions else None)

    def output(self, features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
        """transformers' vision-encoder output: the pre-merger states of all patches, the merged features of each
        item as `pooler_output`, and what was recorded."""
        return BaseModelOutputWithPooling(
            last_hidden_state=torch.cat(self.last),
            pooler_output=tuple(features),
            hidden_states=None if self.hidden_states is None else tuple(torch.cat(h) for h in self.hidden_states),
            attentions=None if self.attentions is None else tuple(tuple(a) for a in self.attentions),
        )


class VambaVisionTower(nn.Module):
    """Patch embedding -> ViT blocks -> 2x2 patch merger: one visual token per 2x28x28 pixel tube."""

    def __init__(self, config: VambaVisionConfig, max_frames: int, batch_items: bool = False):
        super().__init__()
        self.config = config
        self.max_frames = max_frames
        # Consecutive images/videos of one frame size are encoded as one sequence of temporal steps, filling whole
        # frame groups (attention never crosses a step: per step, the same computation as each item alone).
        self.batch_items = batch_items
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                                      in_channels=config.in_channels, embed_dim=config.embed_dim)
        self.rotary = VambaVisionRotary(config)
        self.blocks = nn.ModuleList([VambaVisionBlock(config) for _ in range(config.depth)])
        self.merger = PatchMerger(dim=config.hidden_size, context_dim=config.embed_dim,
                                  spatial_merge_size=config.spatial_merge_size)

    def encode_frames(self, patches: torch.Tensor, height: int, width: int,
                      record: Optional[TowerRecord] = None) -> torch.Tensor:
        """patches: (F*height*width, C*T*P*P) of F temporal steps -> (F*height*width/merge^2, hidden_size)."""
        frames = self.patch_embed(patches).view(-1, height * width, self.config.embed_dim)
        rotary = self.rotary(height, width, frames.device)
        recording = record is not None
        for i, block in enumerate(self.blocks):
            if recording and record.hidden_states is not None:
                record.hidden_states[i].append(frames.reshape(-1, self.config.embed_dim))
            frames = block(frames, rotary, record.attentions[i] if recording and record.attentions else None)
        frames = frames.reshape(-1, self.config.embed_dim)
        if recording:
            record.last.append(frames)
            if record.hidden_states is not None:
                record.hidden_states[-1].append(frames)
        return self.merger(frames)

    def encode_steps(self, patches: torch.Tensor, steps: int, height: int, width: int,
                     record: Optional[TowerRecord] = None) -> torch.Tensor:
        """All `steps` temporal steps of `patches`, max_frames steps at a time."""
        per_step = height * width
        groups = [
            self.encode_frames(patches[start * per_step : (start + self.max_frames) * per_step], height, width, record)
            for start in range(0, steps, self.max_frames)
        ]
        return torch.cat(groups) if len(groups) > 1 else groups[0]

    def runs(self, grid: list[list[int]]) -> list[list[list[int]]]:
        """The items (t, h, w) encoded together: each alone, or with `batch_items` each run of consecutive items of
        one frame size."""
        if not self.batch_items:
            return [[item] for item in grid]
        return [list(run) for _, run in groupby(grid, key=lambda item: tuple(item[1:]))]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                record: Optional[TowerRecord] = None) -> list[torch.Tensor]:
        """One (tokens, hidden_size) tensor per image/video of `grid_thw`; `record` keeps more of the encoding."""
        outputs = []
        runs = self.runs(grid_thw.tolist())
        patches_per_run = [sum(t * h * w for t, h, w in run) for run in runs]
        merged = self.config.spatial_merge_size**2
        for patches, run in zip(pixel_values.split(patches_per_run), runs):
            _, height, width = run[0]
            encoded = self.encode_steps(patches, sum(t for t, _, _ in run), height, width, record)
            outputs.extend(encoded.split([t * h * w // merged for t, h, w in run]) if len(run) > 1 else [encoded])
        return outputs
