"""The vision tower: Qwen2-VL's ViT, unchanged in its weights (`visual.*` of the checkpoint).

Patch embedding (a 3-D convolution over 2x14x14 pixel tubes) -> ViT blocks with 2-D rotary -> a 2x2 patch merger:
one visual token per 2x28x28 tube. Attention never crosses a temporal step, so all frames of one video (which share
a size) attend as one batch, and a long video is encoded a group of frames at a time.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_vamba import VambaVisionConfig
from .layers_vamba import FusedOnCuda, apply_rotary, attention_interface, sdpa_backends


class PatchEmbed(nn.Module):
    """Rows of flattened (C, T, P, P) pixel tubes -> (rows, embed_dim), through one strided Conv3d."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size, self.temporal_patch_size = patch_size, temporal_patch_size
        self.in_channels, self.embed_dim = in_channels, embed_dim
        kernel = [temporal_patch_size, patch_size, patch_size]
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        tubes = patches.view(-1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        return self.proj(tubes.to(self.proj.weight.dtype)).view(-1, self.embed_dim)


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
        self.patch_embed = PatchEmbed(patch_size=config.patch_size, temporal_patch_size=config.temporal_patch_size,
                                      in_channels=config.in_channels, embed_dim=config.embed_dim)
        self.rotary = VambaVisionRotary(config)
        self.blocks = nn.ModuleList([VambaVisionBlock(config) for _ in range(config.depth)])
        self.merger = PatchMerger(dim=config.hidden_size, context_dim=config.embed_dim,
                                  spatial_merge_size=config.spatial_merge_size)

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
