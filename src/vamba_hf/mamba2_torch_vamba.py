"""The Mamba-2 ops in PyTorch, with exactly the signatures of mamba-ssm's and causal-conv1d's kernels (any device,
any dtype; computed in fp32). The reference that the kernel tables are compared with, and the op table that runs
where no kernel does."""

import torch
import torch.nn.functional as F


def refuse_options(op: str, path: str, **options):
    """Our ops take every argument of the kernels' signatures; those Vamba never uses are refused."""
    used = [name for name, value in options.items() if value not in (None, False)]
    if used:
        raise NotImplementedError(f"{op} ({path}) does not implement {', '.join(used)}.")


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L) with [i, j] = x[j+1] + ... + x[i] for j <= i and -inf above the diagonal.

    Summed directly, as mamba-ssm's ssd_minimal (`segsum`) and transformers' Mamba-2 (`segment_sum`) do, not as
    cumsum[i] - cumsum[j] (ssd_minimal's `segsum_unstable`): the cumulative sums of dt*A grow large and negative
    along a chunk, and the difference of two large fp32 numbers loses the small segment sums that the decay exp()
    needs."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)  # [..., i, j] = x[i]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    sums = torch.cumsum(x.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


# Bytes of fp32 (heads, L, L) decay blocks the PyTorch scan builds at once: a long segment's intra-chunk terms are
# taken a group of chunks at a time instead of materialising the decay of every chunk together.
TORCH_SCAN_BLOCK_BYTES = 2**28


def chunk_ids(seq_idx: torch.Tensor, padded_length: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """seq_idx (b, l) padded to `padded_length` with each row's last id, as (b, chunks, L); and the id each chunk's
    carried state belongs to (b, chunks): the previous chunk's last id, 0 (the initial state's) for the first."""
    pad = padded_length - seq_idx.shape[1]
    ids = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1) if pad else seq_idx
    ids = ids.reshape(seq_idx.shape[0], -1, chunk_size)
    carried_in = F.pad(ids[:, :-1, -1], (1, 0))
    return ids, carried_in


def pass_states(chunk_states, chunk_log_decay, initial_state):
    """The state entering each chunk and the final state: S_c = exp(chunk_log_decay_c) S_{c-1} + chunk_states_c,
    S_{-1} = initial_state, solved at once for every chunk as a lower-triangular product (no loop over chunks).

    chunk_states (b, c, h, p, n), chunk_log_decay (b, h, c) (-inf where a chunk drops its carried state)."""
    states = torch.cat([initial_state[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    decay = torch.exp(segment_sum(F.pad(chunk_log_decay, (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay, states)
    return states[:, :-1], states[:, -1].clone()  # its own storage: a kept state must not hold every chunk's


def intra_chunk_outputs(C, B, a_dt, x_dt, ids):
    """y of each position from the inputs of its own chunk: sum_s (C_l . B_s) exp(a_dt[s+1..l]) x_dt_s, s <= l.
    C, B (b, c, L, g, n) per group; taken over chunks in groups small enough that their (heads, L, L) decays stay
    under TORCH_SCAN_BLOCK_BYTES."""
    batch, chunks, length, heads = x_dt.shape[:4]
    per_group = max(1, TORCH_SCAN_BLOCK_BYTES // (4 * heads * length * length * batch))
    outputs = []
    for first in range(0, chunks, per_group):
        part = slice(first, first + per_group)
        scores = torch.einsum("bclgn,bcsgn->bgcls", C[:, part], B[:, part])
        weights = scores.repeat_interleave(heads // scores.shape[1], dim=1) * torch.exp(segment_sum(a_dt[:, :, part]))
        if ids is not None:
            weights = weights * (ids[:, None, part, :, None] == ids[:, None, part, None, :])
        outputs.append(torch.einsum("bhcls,bcshp->bclhp", weights, x_dt[:, part]))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def ssd_scan_torch(x, dt, A, B, C, chunk_size, initial_state=None, seq_idx=None):
    """The Mamba-2 state-space recurrence S_t = exp(dt_t*A) S_{t-1} + dt_t B_t x_t^T, y_t = C_t S_t, computed in
    chunks (the SSD form: quadratic inside a chunk, a triangular product across chunks), in fp32.

    x (b, l, h, p), dt (b, l, h) already softplus'ed, A (h,), B and C (b, l, g, n), initial_state (b, h, p, n),
    seq_idx (b, l) non-decreasing ints: the state resets where it changes; `initial_state` belongs to seq id 0.
    Returns y (b, l, h, p) and the final state (b, h, p, n).
    """
    batch, length, heads, headdim = x.shape
    groups, state_dim = B.shape[-2:]
    pad = (-length) % chunk_size
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    chunks = (length + pad) // chunk_size

    def to_chunks(t):
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    B, C = to_chunks(B), to_chunks(C)  # (b, c, L, g, n)
    x_dt = to_chunks(x * dt[..., None])  # (b, c, L, h, p)
    a_dt = to_chunks(dt * A.float()).permute(0, 3, 1, 2)  # (b, h, c, L)
    a_cumsum = torch.cumsum(a_dt, dim=-1)

    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, L)
    decay_from_start = torch.exp(a_cumsum)
    chunk_log_decay = a_cumsum[..., -1]  # (b, h, c)
    ids = None
    if seq_idx is not None:
        ids, carried_in = chunk_ids(seq_idx, length + pad, chunk_size)
        decay_to_end = decay_to_end * (ids == ids[..., -1:])[:, None]
        decay_from_start = decay_from_start * (ids == carried_in[..., None])[:, None]
        kept = (carried_in == ids[..., -1])[:, None]  # (b, 1, c): the carried state survives the whole chunk
        chunk_log_decay = chunk_log_decay.masked_fill(~kept, float("-inf"))

    y_inside = intra_chunk_outputs(C, B, a_dt, x_dt, ids)
    B, C = (t.repeat_interleave(heads // groups, dim=3) for t in (B, C))  # (b, c, L, h, n)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x_dt)
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, headdim, state_dim)
    states_in, state = pass_states(chunk_states, chunk_log_decay, initial_state.float())
    y_carried = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states_in, decay_from_start)

    y = (y_inside + y_carried).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    return y, state


def torch_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """mamba-ssm's `mamba_chunk_scan_combined` in PyTorch: y = SSD scan + D skip, in x's dtype."""
    refuse_options("mamba_chunk_scan_combined", "PyTorch path", z=z, cu_seqlens=cu_seqlens, return_varlen_states=return_varlen_states)
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
    refuse_options("causal_conv1d_fn", "PyTorch path", return_final_states=return_final_states, final_states_out=final_states_out)
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
    refuse_options("rmsnorm_fn", "PyTorch path", bias=bias)
    group_size = x.shape[-1] if group_size is None else group_size
    y, gate = x.float(), None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        y = y * gate
    grouped = y.unflatten(-1, (-1, group_size))
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)
