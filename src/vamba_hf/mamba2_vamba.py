"""Mamba-2 over the visual stream: in_proj -> causal depthwise conv -> SSD scan -> gated RMSNorm -> out_proj.

Three op tables compute one function: mamba-ssm's Triton kernels with causal-conv1d (CUDA, built for the user's
torch), our own Triton kernels (`mamba2_triton_vamba`: CUDA, nothing beyond PyTorch's wheels), and PyTorch ops
(`mamba2_torch_vamba`: any device, any dtype), all with mamba-ssm's / causal-conv1d's signatures. `Mamba2` picks the
table once per call and never branches on the backend again. Long streams are scanned in segments that carry the convolution and SSM states
across, so no kernel sees more than 2**31 elements.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import os

import torch
from torch import nn

from .configuration_vamba import VambaConfig, VambaMambaConfig
from .layers_vamba import VambaRMSNorm
from .mamba2_torch_vamba import (
    segment_sum,
    ssd_scan_torch,
    torch_causal_conv1d_fn,
    torch_chunk_scan_combined,
    torch_gated_rmsnorm_fn,
)
from .mamba2_triton_vamba import TRITON_ERROR as _TRITON_ERROR
from .mamba2_triton_vamba import (
    triton_causal_conv1d_fn,
    triton_chunk_scan_combined,
    triton_gated_rmsnorm_fn,
    triton_rms_norm_fn,
)

try:
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as _kernel_rms_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn as _kernel_gated_rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel_chunk_scan
except Exception as error:  # a missing, broken or CPU-only install must never break the import
    _kernel_chunk_scan = _kernel_gated_rmsnorm_fn = _kernel_rms_norm_fn = None
    _MAMBA_SSM_ERROR = f"{type(error).__name__}: {error}"
else:
    _MAMBA_SSM_ERROR = None

try:
    from causal_conv1d import causal_conv1d_fn as _kernel_causal_conv1d_fn
except Exception as error:
    _kernel_causal_conv1d_fn = None
    _CAUSAL_CONV1D_ERROR = f"{type(error).__name__}: {error}"
else:
    _CAUSAL_CONV1D_ERROR = None

# The Triton/CUDA kernels index with 32-bit integers: no tensor they touch may reach 2**31 elements.
KERNEL_MAX_ELEMENTS = 2**31 - 1


def kernels_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why mamba-ssm's kernels cannot run on `device` (None: they can)."""
    if device.type != "cuda":
        return f"tensors are on {device.type}"
    if _MAMBA_SSM_ERROR:
        return f"mamba-ssm is not usable ({_MAMBA_SSM_ERROR})"
    if _CAUSAL_CONV1D_ERROR:
        return f"causal-conv1d is not usable ({_CAUSAL_CONV1D_ERROR})"
    return None


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why our Triton kernels cannot run on `device` (None: they can). On CPU they run only under Triton's
    interpreter (TRITON_INTERPRET=1), which the tests use."""
    if _TRITON_ERROR:
        return f"Triton is not usable ({_TRITON_ERROR})"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {device.type}"
    return None


@dataclass(frozen=True)
class Mamba2Ops:
    """One implementation of the four ops a Mamba-2 block needs, with mamba-ssm's / causal-conv1d's signatures."""

    name: str
    chunk_scan: Callable
    causal_conv1d: Callable
    gated_rmsnorm: Callable
    # A plain RMSNorm kernel for the block's input norm; None: the module's own (eager) RMSNorm.
    rms_norm: Optional[Callable]


TORCH_OPS = Mamba2Ops("torch", torch_chunk_scan_combined, torch_causal_conv1d_fn, torch_gated_rmsnorm_fn, None)
TRITON_OPS = Mamba2Ops("triton", triton_chunk_scan_combined, triton_causal_conv1d_fn, triton_gated_rmsnorm_fn,
                       triton_rms_norm_fn)
KERNEL_OPS = Mamba2Ops("mamba-ssm", _kernel_chunk_scan, _kernel_causal_conv1d_fn, _kernel_gated_rmsnorm_fn,
                       _kernel_rms_norm_fn)
OP_TABLES = {ops.name: ops for ops in (KERNEL_OPS, TRITON_OPS, TORCH_OPS)}
# The order in which CUDA tensors get a table, fastest first, as measured by benchmarks/bench_mamba_backends.py.
CUDA_PREFERENCE = ("mamba-ssm", "triton")


def backend_unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why the op table `name` cannot run on `device` (None: it can)."""
    if name not in OP_TABLES:
        raise ValueError(f"Unknown Mamba-2 backend {name!r}; choose one of {', '.join(OP_TABLES)} (or None for the "
                         f"fastest that runs).")
    if name == "torch":
        return None
    return kernels_unavailable_reason(device) if name == "mamba-ssm" else triton_unavailable_reason(device)


def select_ops(device: torch.device, requested: Optional[str] = None) -> Mamba2Ops:
    """The op table for tensors on `device`: `requested` by name (refused with the reason where it cannot run), else
    the fastest that runs there (CUDA_PREFERENCE on CUDA, PyTorch elsewhere)."""
    if requested is not None:
        reason = backend_unavailable_reason(requested, device)
        if reason:
            raise RuntimeError(f"Mamba-2 backend {requested!r} cannot run: {reason}. Set mamba_backend to None to "
                               f"use the fastest that runs.")
        return OP_TABLES[requested]
    if device.type == "cuda":
        for name in CUDA_PREFERENCE:
            if backend_unavailable_reason(name, device) is None:
                return OP_TABLES[name]
    return TORCH_OPS


def missing_kernels_warning(device: torch.device) -> Optional[str]:
    """What to tell a user whose CUDA tensors run the PyTorch path (no kernel table runs there); None otherwise."""
    if device.type != "cuda" or select_ops(device) is not TORCH_OPS:
        return None
    return (f"Vamba: {kernels_unavailable_reason(device)} and {triton_unavailable_reason(device)}; running Mamba-2 "
            f"with the PyTorch path (correct but about 4x slower). For the fast path use PyTorch's CUDA wheel on "
            f"Linux, which ships Triton (our kernels then run, nothing to build), or install mamba-ssm's kernels: "
            f"pip install 'vamba-hf[cuda]' (mamba-ssm and causal-conv1d built for your torch and CUDA).")


# -- the block ------------------------------------------------------------------------------------------------------


@dataclass
class MambaCarry:
    """What one segment of the visual stream hands to the next: the SSM state, the last d_conv-1 inputs of the
    convolution, and (packed rows) their sequence ids."""

    state: torch.Tensor
    conv_inputs: torch.Tensor
    conv_ids: Optional[torch.Tensor]


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) taken per group of channels (mamba-ssm's RMSNormGated with norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, ops: Mamba2Ops = TORCH_OPS) -> torch.Tensor:
        return ops.gated_rmsnorm(y, self.weight, None, z=z, eps=self.eps, group_size=self.group_size,
                                 norm_before_gate=False)


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
        self.use_kernels = True  # False forces the PyTorch ops (e.g. to compare the two)
        self.backend_request: Optional[str] = None  # an OP_TABLES name; None: the fastest that runs

    def ops(self, device: torch.device) -> Mamba2Ops:
        """The op table for tensors on `device`: the requested one, else the fastest that runs there."""
        return select_ops(device, self.backend_request) if self.use_kernels else TORCH_OPS

    def backend(self, device: torch.device) -> str:
        return self.ops(device).name

    def segment_length(self, batch: int) -> int:
        """Tokens per segment: at most `max_tokens`, and few enough that in_proj's output stays under 2**31."""
        limit = min(self.max_tokens, KERNEL_MAX_ELEMENTS // (self.in_proj.out_features * batch))
        return max(self.config.chunk_size, limit - limit % self.config.chunk_size)

    def forward(self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u (b, l, hidden_dim) -> (b, l, hidden_dim), causal along l. seq_idx (b, l): packed rows, the state resets
        where it changes."""
        outputs = [out for _, out, _ in self.segments(u, seq_idx)]
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def segments(self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None, norm: Optional[Callable] = None,
                 carry: Optional[MambaCarry] = None):
        """Yield (start, output, carry after it) for each segment of u in order, the state carried across, from
        `carry` (the end of an earlier stream this one continues). `norm(x, ops)` is applied to each segment's
        input, so that no normalised copy of the whole stream is ever held."""
        ops = self.ops(u.device)
        step = self.segment_length(u.shape[0])
        for start in range(0, u.shape[1], step):
            part = u[:, start : start + step]
            ids = None if seq_idx is None else seq_idx[:, start : start + step]
            out, carry = self.mix(self.in_proj(part if norm is None else norm(part, ops)), ids, carry, ops)
            yield start, out, carry

    def mix(self, zxbcdt, seq_idx, carry: Optional[MambaCarry], ops: Mamba2Ops):
        z, xbc, dt = zxbcdt.split([self.d_inner, self.d_inner + 2 * self.bc_dim, self.nheads], dim=-1)
        next_carry_inputs, next_carry_ids = self.last_conv_inputs(xbc, carry, seq_idx)
        xbc = self.conv(xbc, seq_idx, carry, ops)
        x, B, C = xbc.split([self.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        y, state = self.scan(x, dt, B, C, seq_idx, carry, ops)
        y = self.norm(y.reshape(*x.shape[:2], self.d_inner), z, ops)
        return self.out_proj(y.to(z.dtype)), MambaCarry(state, next_carry_inputs, next_carry_ids)

    def last_conv_inputs(self, xbc, carry: Optional[MambaCarry], seq_idx):
        """The last d_conv-1 convolution inputs after this segment, and their ids: a segment shorter than that
        keeps the end of the carried inputs before its own (zeros at the start of a stream, the conv's padding)."""
        tail = self.config.d_conv - 1
        if seq_idx is not None or xbc.shape[1] >= tail:
            # A copy: a view would keep the segment's whole in_proj output alive for as long as the carry (a video
            # state keeps one per layer).
            return xbc[:, -tail:].clone(), None if seq_idx is None else seq_idx[:, -tail:]
        before = xbc.new_zeros(xbc.shape[0], tail, xbc.shape[2]) if carry is None else carry.conv_inputs
        return torch.cat([before.to(xbc.dtype), xbc], dim=1)[:, -tail:], None

    def conv(self, xbc, seq_idx, carry: Optional[MambaCarry], ops: Mamba2Ops) -> torch.Tensor:
        """SiLU(causal conv) of xbc (b, l, d), continuing the previous segment's inputs."""
        weight = self.conv1d.weight.squeeze(1)
        if carry is not None and seq_idx is None:  # the previous inputs enter as the conv's initial state
            initial = carry.conv_inputs.contiguous().transpose(1, 2)
            return ops.causal_conv1d(xbc.transpose(1, 2), weight, self.conv1d.bias, seq_idx=None,
                                     initial_states=initial, activation="silu").transpose(1, 2)
        length, ids = xbc.shape[1], seq_idx
        if carry is not None:  # causal-conv1d takes no initial state with seq_idx: prepend the inputs instead
            xbc = torch.cat([carry.conv_inputs, xbc], dim=1)
            ids = torch.cat([carry.conv_ids, seq_idx], dim=1)
        ids = None if ids is None else ids.to(torch.int32).contiguous()
        out = ops.causal_conv1d(xbc.transpose(1, 2), weight, self.conv1d.bias, seq_idx=ids, initial_states=None,
                                activation="silu")
        return out.transpose(1, 2)[:, xbc.shape[1] - length :]

    def scan(self, x, dt, B, C, seq_idx, carry: Optional[MambaCarry], ops: Mamba2Ops):
        """The SSD scan of one segment, from the carried state; returns y (b, l, d_inner) and the final state."""
        cfg = self.config
        batch, length = x.shape[:2]
        scan_ids = None
        if seq_idx is not None:  # id 0 marks the sequence that the carried state belongs to
            previous = carry.conv_ids[:, -1:] if carry is not None else seq_idx[:, :1]
            scan_ids = (seq_idx - previous).to(torch.int32).contiguous()
        A = -torch.exp(self.A_log.float())
        D = self.D.view(self.nheads, cfg.headdim) if cfg.D_has_hdim else self.D
        return ops.chunk_scan(
            x.reshape(batch, length, self.nheads, cfg.headdim), dt, A,
            B.reshape(batch, length, cfg.ngroups, cfg.d_state), C.reshape(batch, length, cfg.ngroups, cfg.d_state),
            cfg.chunk_size, D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=cfg.dt_limit,
            initial_states=None if carry is None else carry.state, seq_idx=scan_ids, return_final_states=True,
        )


class VambaVisionMixer(nn.Module):
    """The visual stream's block in each layer: v + Mamba2(RMSNorm(v))."""

    def __init__(self, config: VambaConfig):
        super().__init__()
        self.norm = VambaRMSNorm(config.hidden_size, eps=1e-5)
        self.mixer = Mamba2(config.vision_mamba_mixer_config, config.mamba_max_tokens)

    def forward(self, visual: torch.Tensor, seq_idx: Optional[torch.Tensor] = None, in_place: bool = False):
        """`in_place` adds the output into `visual` segment by segment (each segment's output needs only its own
        input and the carried state), so that a second stream of visual length is never held."""
        if not in_place:
            return visual + self.mixer(self.norm(visual), seq_idx)
        for start, mixed, _ in self.mixer.segments(visual, seq_idx, self.segment_norm):
            visual[:, start : start + mixed.shape[1]] += mixed
        return visual

    def continue_stream(self, visual: torch.Tensor, carry: Optional[MambaCarry]) -> tuple[torch.Tensor, MambaCarry]:
        """The block on `visual` (updated in place) as the continuation of a stream that ended with `carry` (None:
        a stream's start); returns it and the carry at its end."""
        for start, mixed, carry in self.mixer.segments(visual, None, self.segment_norm, carry):
            visual[:, start : start + mixed.shape[1]] += mixed
        return visual, carry

    def segment_norm(self, x: torch.Tensor, ops: Mamba2Ops) -> torch.Tensor:
        """The RMSNorm, as one fused kernel pass where the kernels run (the eager one makes several passes in fp32
        over the visual stream, in every layer). Equal up to bf16 rounding."""
        if ops.rms_norm is None:
            return self.norm(x)
        return ops.rms_norm(x, self.norm.weight, None, eps=self.norm.variance_epsilon)
