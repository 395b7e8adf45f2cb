"""Mamba-2 over the visual stream: in_proj -> causal depthwise conv -> SSD scan -> gated RMSNorm -> out_proj.

Two op tables compute one function: mamba-ssm's Triton kernels with causal-conv1d (CUDA), and PyTorch ops written
with exactly those kernels' signatures (any device, any dtype). `Mamba2` picks the table once per call and never
branches on the backend again. Long streams are scanned in segments that carry the convolution and SSM states
across, so no kernel sees more than 2**31 elements.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_vamba import VambaConfig, VambaMambaConfig
from .layers_vamba import VambaRMSNorm

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
    if device.type != "cuda":
        return f"tensors are on {device.type}"
    if _MAMBA_SSM_ERROR:
        return f"mamba-ssm is not usable ({_MAMBA_SSM_ERROR})"
    if _CAUSAL_CONV1D_ERROR:
        return f"causal-conv1d is not usable ({_CAUSAL_CONV1D_ERROR})"
    return None


def _refuse_options(op: str, **options):
    """The PyTorch ops take every argument of the kernels' signatures; those Vamba never uses are refused."""
    used = [name for name, value in options.items() if value not in (None, False)]
    if used:
        raise NotImplementedError(f"{op} (PyTorch path) does not implement {', '.join(used)}.")


# -- the PyTorch op table -----------------------------------------------------------------------------------------


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L) with [i, j] = x[j+1] + ... + x[i] for j <= i and -inf above the diagonal.

    Summed directly, not as cumsum[i] - cumsum[j] (as mamba-ssm's ssd_minimal and transformers' Mamba-2 do): the
    cumulative sums of dt*A grow large and negative along a chunk, and the difference of two large fp32 numbers
    loses the small segment sums that the decay exp() needs."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)  # [..., i, j] = x[i]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    sums = torch.cumsum(x.masked_fill(~strictly_lower, 0), dim=-2)
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


def torch_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """mamba-ssm's `mamba_chunk_scan_combined` in PyTorch: y = SSD scan + D skip, in x's dtype."""
    _refuse_options("mamba_chunk_scan_combined", z=z, cu_seqlens=cu_seqlens, return_varlen_states=return_varlen_states)
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    y, state = ssd_scan_torch(x, dt, A, B, C, chunk_size, initial_states, seq_idx)
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def torch_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                           final_states_out=None, activation=None):
    """causal-conv1d's `causal_conv1d_fn` in PyTorch: depthwise causal conv over time. x (b, d, l), weight (d, k),
    initial_states (b, d, k-1) the inputs before x; taps never cross a change of seq_idx (b, l)."""
    _refuse_options("causal_conv1d_fn", return_final_states=return_final_states, final_states_out=final_states_out)
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"causal_conv1d_fn: activation {activation!r}")
    width, length = weight.shape[-1], x.shape[-1]
    inputs = x.transpose(1, 2)  # (b, l, d)
    if initial_states is None:
        padded = F.pad(inputs, (0, 0, width - 1, 0))
    else:
        padded = torch.cat([initial_states.transpose(1, 2).to(inputs.dtype), inputs], dim=1)
    out = torch.zeros_like(inputs, dtype=torch.float) if bias is None else bias.float().expand_as(inputs).clone()
    for tap in range(width):
        shift = width - 1 - tap  # this tap reads `shift` steps back
        term = padded[:, tap : tap + length].float() * weight[:, tap].float()
        if seq_idx is not None and shift:
            same = F.pad(seq_idx, (shift, 0), value=-1)[:, :length] == seq_idx
            term = term * same[..., None]
        out = out + term
    out = out if activation is None else F.silu(out)
    return out.to(x.dtype).transpose(1, 2)


def torch_gated_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba-ssm's gated `rmsnorm_fn` in PyTorch: RMSNorm per group of `group_size` channels, gated by silu(z)
    before (norm_before_gate=False) or after the norm. Computed in fp32."""
    _refuse_options("rmsnorm_fn", bias=bias)
    group_size = x.shape[-1] if group_size is None else group_size
    y, gate = x.float(), None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        y = y * gate
    grouped = y.unflatten(-1, (-1, group_size))
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


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
KERNEL_OPS = Mamba2Ops("mamba-ssm", _kernel_chunk_scan, _kernel_causal_conv1d_fn, _kernel_gated_rmsnorm_fn,
                       _kernel_rms_norm_fn)


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

    def ops(self, device: torch.device) -> Mamba2Ops:
        """The op table for tensors on `device`: the CUDA kernels where they run, else PyTorch."""
        return KERNEL_OPS if self.use_kernels and kernels_unavailable_reason(device) is None else TORCH_OPS

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
