"""The Mamba-2 ops as Triton kernels of our own, with mamba-ssm's / causal-conv1d's signatures: the chunked SSD scan,
the causal depthwise conv1d and the (gated) RMSNorm. Triton ships with PyTorch's CUDA wheels on Linux, so these need
nothing beyond `pip install torch`; each kernel compiles on its first call (Triton caches it on disk).

The scan's backward is four more scans by the same kernels (`ChunkScan`); the conv's and the norms' backward passes
recompute the PyTorch ops from their saved inputs.

The scan in three kernels: each chunk's own state (`_chunk_state_kernel`), the states carried across chunks
(`_state_passing_kernel`, sequential over chunks, parallel over state entries), and each position's output from its
chunk and the carried state (`_chunk_scan_kernel`). Decays come from cumulative sums of dt*A taken in float64, so a
segment's decay exp(cs_i - cs_j) keeps the precision that the PyTorch path's direct segment sums have.
"""

import torch
import torch.nn.functional as F

from .mamba2_torch_vamba import (
    refuse_options,
    torch_causal_conv1d_fn,
    torch_chunk_scan_combined,
    torch_gated_rmsnorm_fn,
)

try:
    import triton
    import triton.language as tl
except Exception as error:  # no Triton (CPU wheels, other platforms): the table is unavailable, the import is not
    TRITON_ERROR = f"{type(error).__name__}: {error}"

    class _Absent:
        """Lets the kernel definitions below parse without Triton; they are never launched then."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _Absent
else:
    TRITON_ERROR = None

PATH = "Triton path"


def _block(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"), as the PyTorch path does; tf32 would lose 3 digits."""
    return "ieee" if dtype == torch.float32 else "tf32"


# -- the SSD scan ---------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_kernel(x_ptr, b_ptr, dt_ptr, cs_ptr, ids_ptr, out_ptr, length, chunk_size, chunks,
                        heads_per_group, heads_per_x, headdim, dstate, sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_g, sb_n, sid_b,
                        sid_l, HAS_IDS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, c, h] (p, n) = sum over the chunk's positions l of the chunk-end's sequence:
    x[l] dt[l] exp(cs_end - cs[l]) B[l]^T."""
    pid_n, pid_bc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.num_programs(2)
    batch, chunk = pid_bc // chunks, pid_bc % chunks
    row = (batch.to(tl.int64) * heads + head) * chunks + chunk
    cs_row, dt_row = cs_ptr + row * chunk_size, dt_ptr + row * chunk_size
    cs_end = tl.load(cs_row + chunk_size - 1)
    start = chunk.to(tl.int64) * chunk_size
    x_base = x_ptr + batch.to(tl.int64) * sx_b + (head // heads_per_x).to(tl.int64) * sx_h
    b_base = b_ptr + batch.to(tl.int64) * sb_b + (head // heads_per_group).to(tl.int64) * sb_g
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_IDS:
        last = tl.minimum(start + chunk_size, length) - 1
        id_end = tl.load(ids_ptr + batch.to(tl.int64) * sid_b + last * sid_l)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for first in range(0, chunk_size, BLOCK_L):
        offs_l = first + tl.arange(0, BLOCK_L)
        pos = start + offs_l
        valid = (offs_l < chunk_size) & (pos < length)
        cs = tl.load(cs_row + offs_l, mask=offs_l < chunk_size, other=0.0)
        dt = tl.load(dt_row + offs_l, mask=offs_l < chunk_size, other=0.0)
        if HAS_IDS:
            ids = tl.load(ids_ptr + batch.to(tl.int64) * sid_b + pos * sid_l, mask=valid, other=-1)
            valid = valid & (ids == id_end)
        scale = tl.where(valid, tl.exp((cs_end - cs).to(tl.float32)) * dt, 0.0)
        x = tl.load(x_base + pos[:, None] * sx_l + offs_p[None, :] * sx_p,
                    mask=valid[:, None] & (offs_p[None, :] < headdim), other=0.0)
        b = tl.load(b_base + pos[:, None] * sb_l + offs_n[None, :] * sb_n,
                    mask=valid[:, None] & (offs_n[None, :] < dstate), other=0.0)
        scaled = (x.to(tl.float32) * scale[:, None]).to(b.dtype)
        acc += tl.dot(tl.trans(scaled), b, input_precision=PRECISION)
    out = out_ptr + ((batch.to(tl.int64) * chunks + chunk) * heads + head) * headdim * dstate
    tl.store(out + offs_p[:, None] * dstate + offs_n[None, :], acc,
             mask=(offs_p[:, None] < headdim) & (offs_n[None, :] < dstate))


@triton.jit
def _state_passing_kernel(states_ptr, cs_ptr, keep_ptr, initial_ptr, final_ptr, chunk_size, chunks, size,
                          HAS_INITIAL: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """In place over states (b, c, h, p*n): each chunk's own state becomes the state entering the chunk,
    S_c = exp(cs_end[c-1]) keep[c-1] S_{c-1} + own[c-1], S_0 = initial; the state after the last goes to final."""
    pid, batch, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.num_programs(2)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    bh = batch.to(tl.int64) * heads + head
    if HAS_INITIAL:
        state = tl.load(initial_ptr + bh * size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for chunk in range(chunks):
        slot = states_ptr + ((batch.to(tl.int64) * chunks + chunk) * heads + head) * size + offs
        own = tl.load(slot, mask=mask, other=0.0)
        tl.store(slot, state, mask=mask)
        decay = tl.exp(tl.load(cs_ptr + (bh * chunks + chunk) * chunk_size + chunk_size - 1).to(tl.float32))
        if HAS_IDS:
            decay = decay * tl.load(keep_ptr + batch.to(tl.int64) * chunks + chunk)
        state = state * decay + own
    tl.store(final_ptr + bh * size + offs, state, mask=mask)


@triton.jit
def _chunk_scan_kernel(x_ptr, b_ptr, c_ptr, cb_ptr, dt_ptr, cs_ptr, ids_ptr, carried_ptr, states_ptr, d_ptr, y_ptr,
                       length, chunk_size, chunks, heads_per_group, heads_per_x, headdim, dstate, sx_b, sx_l, sx_h,
                       sx_p, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n, sy_b, sy_l, sy_h, sy_p, sid_b, sid_l,
                       HAS_IDS: tl.constexpr, HAS_D: tl.constexpr, INLINE_SCORES: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """y[l] = exp(cs[l]) C[l] S_in + sum_{s <= l, same sequence} (C[l].B[s]) exp(cs[l] - cs[s]) dt[s] x[s]
    (+ D x[l]) for BLOCK_M positions of one chunk and head. C[l].B[s] comes from cb (b, chunks, g, L, L), or with
    INLINE_SCORES from B and C here (when groups are many, as in the backward's scans)."""
    pid_m, pid_bc, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = tl.num_programs(2)
    batch, chunk = pid_bc // chunks, pid_bc % chunks
    group = head // heads_per_group
    row = (batch.to(tl.int64) * heads + head) * chunks + chunk
    cs_row, dt_row = cs_ptr + row * chunk_size, dt_ptr + row * chunk_size
    start = chunk.to(tl.int64) * chunk_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_m = start + offs_m
    valid_m = (offs_m < chunk_size) & (pos_m < length)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    x_base = x_ptr + batch.to(tl.int64) * sx_b + (head // heads_per_x).to(tl.int64) * sx_h
    b_base = b_ptr + batch.to(tl.int64) * sb_b + group.to(tl.int64) * sb_g
    cs_m = tl.load(cs_row + offs_m, mask=offs_m < chunk_size, other=0.0)

    c = tl.load(c_ptr + batch.to(tl.int64) * sc_b + group.to(tl.int64) * sc_g + pos_m[:, None] * sc_l
                + offs_n[None, :] * sc_n, mask=valid_m[:, None] & (offs_n[None, :] < dstate), other=0.0)
    state_in = states_ptr + ((batch.to(tl.int64) * chunks + chunk) * heads + head) * headdim * dstate
    state = tl.load(state_in + offs_n[:, None] + offs_p[None, :] * dstate,
                    mask=(offs_n[:, None] < dstate) & (offs_p[None, :] < headdim), other=0.0)
    acc = tl.dot(c, state.to(c.dtype), input_precision=PRECISION)
    from_start = tl.exp(cs_m.to(tl.float32))
    if HAS_IDS:
        ids_m = tl.load(ids_ptr + batch.to(tl.int64) * sid_b + pos_m * sid_l, mask=valid_m, other=-1)
        carried = tl.load(carried_ptr + batch.to(tl.int64) * chunks + chunk)
        from_start = tl.where(ids_m == carried, from_start, 0.0)
    acc = acc * from_start[:, None]

    cb_row = ((batch.to(tl.int64) * chunks + chunk) * (heads // heads_per_group) + group) * chunk_size * chunk_size
    end = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    for first in range(0, end, BLOCK_K):
        offs_k = first + tl.arange(0, BLOCK_K)
        pos_k = start + offs_k
        valid_k = (offs_k < chunk_size) & (pos_k < length)
        if INLINE_SCORES:
            b_k = tl.load(b_base + pos_k[:, None] * sb_l + offs_n[None, :] * sb_n,
                          mask=valid_k[:, None] & (offs_n[None, :] < dstate), other=0.0)
            cb = tl.dot(c, tl.trans(b_k), input_precision=PRECISION)
        else:
            cb = tl.load(cb_ptr + cb_row + offs_m[:, None] * chunk_size + offs_k[None, :],
                         mask=(offs_m[:, None] < chunk_size) & (offs_k[None, :] < chunk_size), other=0.0)
        cs_k = tl.load(cs_row + offs_k, mask=offs_k < chunk_size, other=0.0)
        dt_k = tl.load(dt_row + offs_k, mask=offs_k < chunk_size, other=0.0)
        causal = (offs_k[None, :] <= offs_m[:, None]) & valid_m[:, None] & valid_k[None, :]
        if HAS_IDS:
            ids_k = tl.load(ids_ptr + batch.to(tl.int64) * sid_b + pos_k * sid_l, mask=valid_k, other=-2)
            causal = causal & (ids_m[:, None] == ids_k[None, :])
        log_decay = tl.where(causal, (cs_m[:, None] - cs_k[None, :]).to(tl.float32), float("-inf"))
        weights = cb * tl.exp(log_decay) * dt_k[None, :]
        x_k = tl.load(x_base + pos_k[:, None] * sx_l + offs_p[None, :] * sx_p,
                      mask=valid_k[:, None] & (offs_p[None, :] < headdim), other=0.0)
        acc += tl.dot(weights.to(x_k.dtype), x_k, input_precision=PRECISION)

    mask = valid_m[:, None] & (offs_p[None, :] < headdim)
    if HAS_D:
        x_m = tl.load(x_base + pos_m[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mask, other=0.0)
        d = tl.load(d_ptr + head * headdim + offs_p, mask=offs_p < headdim, other=0.0)
        acc += x_m.to(tl.float32) * d[None, :]
    y = y_ptr + batch.to(tl.int64) * sy_b + head.to(tl.int64) * sy_h + pos_m[:, None] * sy_l \
        + offs_p[None, :] * sy_p
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


def processed_dt(dt, dt_bias, dt_softplus, dt_limit):
    """dt as the scan uses it, (b, l, h) fp32."""
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    return dt


def chunked(weights, log_decay, chunk_size):
    """The input weights (b, l, h) and per-step log decays (b, l, h) as (b, h, chunks, L) with zeros past the end:
    the weights in fp32, the decays' cumulative sums within each chunk in float64."""
    batch, length, heads = weights.shape

    def to_chunks(t):
        t = F.pad(t, (0, 0, 0, (-length) % chunk_size))
        return t.reshape(batch, -1, chunk_size, heads).permute(0, 3, 1, 2).contiguous()

    return to_chunks(weights.float()), torch.cumsum(to_chunks(log_decay.double()), dim=-1)


def group_scores(C, B, chunk_size):
    """C_l . B_s of every pair of positions in a chunk, per group: (b, chunks, g, L, L) fp32."""
    batch, length, groups, dstate = B.shape
    pad = (-length) % chunk_size

    def to_chunks(t):
        return F.pad(t.float(), (0, 0, 0, 0, 0, pad)).reshape(batch, -1, chunk_size, groups, dstate).transpose(2, 3)

    return torch.matmul(to_chunks(C), to_chunks(B).transpose(-1, -2))


def scan_chunks(x, B, C, dt, cs, initial_states=None, seq_idx=None, D=None, heads=None):
    """The chunked scan of x (b, l, hx, p) with B, C (b, l, g, n), input weights dt and cumulative log decays cs
    ((b, h, chunks, L), from `chunked`). `heads` (default hx) may be a multiple of hx: head h then reads x's head
    h // (heads / hx) (the backward's scans, where x is B). Returns y (b, l, heads, p) in x's dtype, the final state
    (b, heads, p, n) and the state entering each chunk (b, chunks, heads, p, n), both fp32."""
    batch, length, x_heads, headdim = x.shape
    groups, dstate = B.shape[-2:]
    heads = heads or x_heads
    chunk_size, chunks = cs.shape[-1], cs.shape[2]
    carried = keep = None
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32)
        padded = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, chunks * chunk_size - length)], dim=1)
        chunk_end = padded.reshape(batch, chunks, chunk_size)[..., -1]
        carried = F.pad(chunk_end[:, :-1], (1, 0)).contiguous()
        keep = (carried == chunk_end).float().contiguous()
    precision = _dot_precision(x.dtype)
    states = torch.empty(batch, chunks, heads, headdim, dstate, device=x.device, dtype=torch.float32)
    block_p, block_n = _block(headdim), _block(dstate)
    sid = (0, 0) if seq_idx is None else seq_idx.stride()
    _chunk_state_kernel[(1, batch * chunks, heads)](
        x, B, dt, cs, seq_idx, states, length, chunk_size, chunks, heads // groups, heads // x_heads, headdim,
        dstate, *x.stride(), *B.stride(), *sid, HAS_IDS=seq_idx is not None, PRECISION=precision,
        BLOCK_L=min(64, _block(chunk_size)), BLOCK_P=block_p, BLOCK_N=block_n)
    final = torch.empty(batch, heads, headdim, dstate, device=x.device, dtype=torch.float32)
    initial = None if initial_states is None else initial_states.float().contiguous()
    size = headdim * dstate
    _state_passing_kernel[(triton.cdiv(size, 256), batch, heads)](
        states, cs, keep, initial, final, chunk_size, chunks, size, HAS_INITIAL=initial is not None,
        HAS_IDS=seq_idx is not None, BLOCK=256)
    inline = groups > 1 and groups == heads
    scores = None if inline else group_scores(C, B, chunk_size)
    d = None if D is None else D.float().expand(heads, headdim).contiguous() if D.dim() == 2 else \
        D.float()[:, None].expand(heads, headdim).contiguous()
    y = torch.empty(batch, length, heads, headdim, device=x.device, dtype=x.dtype)
    block_m = min(64, _block(chunk_size))
    _chunk_scan_kernel[(triton.cdiv(chunk_size, block_m), batch * chunks, heads)](
        x, B, C, scores, dt, cs, seq_idx, carried, states, d, y, length, chunk_size, chunks, heads // groups,
        heads // x_heads, headdim, dstate, *x.stride(), *B.stride(), *C.stride(), *y.stride(), *sid,
        HAS_IDS=seq_idx is not None, HAS_D=d is not None, INLINE_SCORES=inline, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=block_m, BLOCK_P=block_p, BLOCK_N=block_n)
    return y, final, states


def scan_forward(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit):
    """mamba-ssm's scan on raw dt: y (b, l, h, p) in x's dtype, the final state and the states entering chunks."""
    dt = processed_dt(dt, dt_bias, dt_softplus, dt_limit)
    weights, cs = chunked(dt, dt * A.float(), chunk_size)
    return scan_chunks(x, B, C, weights, cs, initial_states, seq_idx, D)


class ChunkScan(torch.autograd.Function):
    """The scan with its backward as four more scans of the same kernels (no (L, L) tensor of a whole segment):

    with u_s = sum_{l >= s} (B_s.C_l) exp(cs_l - cs_s) dy_l + exp(cs_end - cs_s) G B_s (G: the final state's
    gradient), which is the scan run backwards in time on dy with B and C exchanged,
      dx = dt u + D dy,   d(initial state) = that backward scan's final state,
      dC_l = sum_h S_l^T dy_l (the scan with x and B exchanged: x := B, B := x, C := dy),
      dB_s = sum_h dt_s (the same backwards in time: x := C, B := dy, C := x),
      dt*A's gradient from dy.(y - D x) - dt x.u (`log_decay_grad`), and from it dt's (plus x.u), A's and
      dt_bias's."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit):
        y, final, _ = scan_forward(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_softplus,
                                   dt_limit)
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx)
        ctx.options = (chunk_size, dt_softplus, dt_limit)
        return y, final

    @staticmethod
    def log_decay_grad(grad_y, y, dt, x_u, log_decay, states, final, grads_after, grad_final, seq_idx, chunk_size):
        """The gradient of each step's dt*A (b, l, h), in float64: the pairs of positions (s < k <= l) that its decay
        sits between. Summed as dy.y - dt x.u over the rest of its own chunk, plus the chunk's end term
        <dL/dS, S> at the next chunk's first step (the final state's at the last), so that the sums that cancel
        stay within one chunk instead of running over the whole segment."""
        batch, length, heads = dt.shape
        chunks = states.shape[1]
        pad = chunks * chunk_size - length
        per_step = (grad_y.float() * y.float()).sum(-1).double() - (dt * x_u).double()  # y: the scan's, no D x
        per_step = F.pad(per_step, (0, 0, 0, pad)).view(batch, chunks, chunk_size, heads)
        within = per_step.flip(2).cumsum(2).flip(2)
        ends = torch.zeros(batch, chunks, heads, device=dt.device, dtype=torch.float64)
        if chunks > 1:  # dL/dS after each next chunk's first step (the backward scan's chunk states), with S before
            after = grads_after[:, 1:].flip(1).flatten(3).unsqueeze(-2)
            before = states[:, 1:].flatten(3).unsqueeze(-1)
            first = torch.arange(1, chunks, device=dt.device) * chunk_size
            decay = torch.exp(log_decay[:, first])
            if seq_idx is not None:
                decay = decay * (seq_idx[:, first] == seq_idx[:, first - 1])[..., None]
            ends[:, :-1] = (after @ before)[..., 0, 0].double() * decay.double()
        if grad_final is not None:
            ends[:, -1] = (grad_final.double() * final.double()).sum((-1, -2))
        return (within + ends[:, :, None]).view(batch, -1, heads)[:, :length]

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, dt_raw, A, B, C, D, dt_bias, initial, seq_idx = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit = ctx.options
        batch, length, heads, headdim = x.shape
        groups, dstate = B.shape[-2:]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_() for t in (dt_raw, dt_bias)]
            dt = processed_dt(leaves[0], leaves[1], dt_softplus, dt_limit)
        log_decay = dt.detach() * A.float()
        weights, cs = chunked(dt.detach(), log_decay, chunk_size)
        y, final, states = scan_chunks(x, B, C, weights, cs, initial, seq_idx)
        chunks = cs.shape[2]
        pad = chunks * chunk_size - length

        def backwards(t):
            """Padded to whole chunks, then reversed in time: the reversed chunks are the forward ones."""
            return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).flip(1)

        # Each step's decay sits between two positions: backwards in time it moves one step.
        ones, cs_back = chunked(torch.ones_like(F.pad(log_decay, (0, 0, 0, pad))),
                                F.pad(backwards(log_decay), (0, 0, 1, 0))[:, :-1], chunk_size)
        ids_back = None
        if seq_idx is not None:
            padded_ids = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
            ids_back = padded_ids[:, -1:] - padded_ids.flip(1)
        dy_back = backwards(grad_y)
        u, grad_start, grads_after = scan_chunks(dy_back, backwards(C), backwards(B), ones, cs_back, grad_final,
                                                 ids_back)
        u = u.flip(1)[:, :length].float()
        grad_start = grad_start * torch.exp(log_decay[:, 0])[..., None, None]
        if seq_idx is not None:
            grad_start = grad_start * (seq_idx[:, 0] == 0)[:, None, None, None]

        per_head_d = None if D is None else (D.float()[:, None] if D.dim() == 1 else D.float())
        grad_x = dt[..., None].detach() * u + (0 if D is None else grad_y.float() * per_head_d)
        x_u = (x.float() * u).sum(-1)
        grad_log_decay = ChunkScan.log_decay_grad(grad_y, y, dt.detach(), x_u, log_decay, states, final,
                                                  grads_after, grad_final, seq_idx, chunk_size)
        grad_dt = x_u + (A.double() * grad_log_decay).float()
        grad_A = (dt.detach().double() * grad_log_decay).sum((0, 1))
        grad_D = None
        if D is not None:
            products = grad_y.float() * x.float()
            grad_D = products.sum((0, 1, 3)) if D.dim() == 1 else products.sum((0, 1))

        per_head = heads // groups
        state_t = None if initial is None else initial.transpose(-1, -2)
        # Summed over the heads of a group in fp32 as they are read, never as an fp32 copy per head; dB's dt_s
        # (a factor of the position it is read at) goes into x, which that scan reads at the same position.
        dc, _, _ = scan_chunks(B, x, grad_y, weights, cs, state_t, seq_idx, heads=heads)
        grad_C = dc.view(batch, length, groups, per_head, dstate).sum(3, dtype=torch.float32)
        grad_final_t = None if grad_final is None else grad_final.transpose(-1, -2)
        x_dt = backwards(x * dt.detach()[..., None].to(x.dtype))
        db, _, _ = scan_chunks(backwards(C), dy_back, x_dt, ones, cs_back, grad_final_t, ids_back, heads=heads)
        grad_B = db.view(batch, -1, groups, per_head, dstate).sum(3, dtype=torch.float32).flip(1)[:, :length]

        wanted = [t for t in leaves if t is not None]
        grad_raw = dict(zip(map(id, wanted), torch.autograd.grad(dt, wanted, grad_dt)))
        return (grad_x.to(x.dtype), grad_raw[id(leaves[0])].to(dt_raw.dtype), grad_A.to(A.dtype),
                grad_B.to(B.dtype), grad_C.to(C.dtype), None if D is None else grad_D.to(D.dtype),
                None if dt_bias is None else grad_raw[id(leaves[1])].to(dt_bias.dtype),
                None if initial is None else grad_start.to(initial.dtype), None, None, None, None)


def triton_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                               seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                               return_final_states=False, return_varlen_states=False):
    """mamba-ssm's `mamba_chunk_scan_combined` as our Triton kernels: y = SSD scan + D skip, in x's dtype."""
    refuse_options("mamba_chunk_scan_combined", PATH, z=z, cu_seqlens=cu_seqlens,
                   return_varlen_states=return_varlen_states)
    tensors = (x, dt, A, B, C, D, dt_bias, initial_states)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, final = ChunkScan.apply(*tensors, seq_idx, chunk_size, dt_softplus, tuple(dt_limit))
    else:
        y, final, _ = scan_forward(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_softplus,
                                   dt_limit)
    return (y, final) if return_final_states else y


# -- the convolution and the norms ----------------------------------------------------------------------------------


@triton.jit
def _causal_conv_kernel(x_ptr, w_ptr, bias_ptr, initial_ptr, ids_ptr, out_ptr, length, dim, sx_b, sx_d, sx_l,
                        sw_d, sw_k, si_b, si_d, si_k, sid_b, sid_l, so_b, so_d, so_l, WIDTH: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_INITIAL: tl.constexpr, HAS_IDS: tl.constexpr,
                        SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = act(bias + sum_k w[k] x[t - (WIDTH-1-k)]), the inputs before the start read from the initial state,
    a tap that crosses a change of seq_idx reading zero."""
    pid_l, pid_d, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_l, in_d = offs_l < length, offs_d < dim
    if HAS_BIAS:
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32) + \
            tl.load(bias_ptr + offs_d, mask=in_d, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_IDS:
        ids_t = tl.load(ids_ptr + batch * sid_b + offs_l * sid_l, mask=in_l, other=-1)
    for tap in tl.static_range(WIDTH):
        src = offs_l - (WIDTH - 1 - tap)
        inside = in_l & (src >= 0)
        value = tl.load(x_ptr + batch * sx_b + src[:, None] * sx_l + offs_d[None, :] * sx_d,
                        mask=inside[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        if HAS_INITIAL:
            before = in_l & (src < 0)
            value += tl.load(initial_ptr + batch * si_b + (src + WIDTH - 1)[:, None] * si_k + offs_d[None, :] * si_d,
                             mask=before[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        if HAS_IDS:
            if WIDTH - 1 - tap > 0:
                ids_src = tl.load(ids_ptr + batch * sid_b + src * sid_l, mask=inside, other=-2)
                value = tl.where((ids_src == ids_t)[:, None], value, 0.0)
        weight = tl.load(w_ptr + offs_d * sw_d + tap * sw_k, mask=in_d, other=0.0).to(tl.float32)
        acc += value * weight[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + batch * so_b + offs_l[:, None] * so_l + offs_d[None, :] * so_d,
             acc.to(out_ptr.dtype.element_ty), mask=in_l[:, None] & in_d[None, :])


def conv_forward(x, weight, bias, seq_idx, initial_states, activation):
    batch, dim, length = x.shape
    width = weight.shape[-1]
    out = torch.empty_like(x)
    ids = None if seq_idx is None else seq_idx.to(torch.int32)
    block_l, block_d = 64, 64
    _causal_conv_kernel[(triton.cdiv(length, block_l), triton.cdiv(dim, block_d), batch)](
        x, weight, bias, initial_states, ids, out, length, dim, *x.stride(), *weight.stride(),
        *(initial_states.stride() if initial_states is not None else (0, 0, 0)),
        *(ids.stride() if ids is not None else (0, 0)), *out.stride(), WIDTH=width, HAS_BIAS=bias is not None,
        HAS_INITIAL=initial_states is not None, HAS_IDS=ids is not None, SILU=activation in ("silu", "swish"),
        BLOCK_L=block_l, BLOCK_D=block_d)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, group_size, sx_row, sz_row, sy_row, eps, HAS_Z: tl.constexpr,
                     NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    """One row's group of channels: RMSNorm(x) * w, gated by silu(z) before or after the norm."""
    row, group = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < group_size
    cols = group * group_size + offs
    x = tl.load(x_ptr + row * sx_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * sz_row + cols, mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / group_size + eps)
    y = x * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(y_ptr + row * sy_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def norm_forward(x, weight, z, eps, group_size, norm_before_gate):
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    x2 = rows(x)
    z2 = None if z is None else rows(z)
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(group_size)
    _rms_norm_kernel[(x2.shape[0], dim // group_size)](
        x2, z2, weight, y, group_size, x2.stride(0), 0 if z2 is None else z2.stride(0), y.stride(0), eps,
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y.reshape(x.shape)


class Recomputed(torch.autograd.Function):
    """A kernel's forward with the PyTorch op's backward: `reference` recomputed under autograd from the saved
    inputs (the conv and the norms are cheap to recompute; their fp32 intermediates live only in the backward)."""

    @staticmethod
    def forward(ctx, kernel, reference, *tensors):
        ctx.reference = reference
        ctx.save_for_backward(*tensors)
        return kernel(*tensors)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[2:]
        inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad():
            out = ctx.reference(*inputs)
        found = dict(zip(map(id, wanted), torch.autograd.grad(out, wanted, grad, allow_unused=True)))
        return (None, None, *(None if t is None else found.get(id(t)) for t in inputs))


def with_backward(kernel, reference, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return Recomputed.apply(kernel, reference, *tensors)
    return kernel(*tensors)


def triton_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                            final_states_out=None, activation=None):
    """causal-conv1d's `causal_conv1d_fn` as our Triton kernel: x (b, d, l), weight (d, k), initial_states
    (b, d, k-1), seq_idx (b, l)."""
    refuse_options("causal_conv1d_fn", PATH, return_final_states=return_final_states,
                   final_states_out=final_states_out)
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"causal_conv1d_fn: activation {activation!r}")

    def kernel(x, weight, bias, initial_states):
        return conv_forward(x, weight, bias, seq_idx, initial_states, activation)

    def reference(x, weight, bias, initial_states):
        return torch_causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                                      activation=activation)

    return with_backward(kernel, reference, x, weight, bias, initial_states)


def triton_gated_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba-ssm's gated `rmsnorm_fn` as our Triton kernel."""
    refuse_options("rmsnorm_fn", PATH, bias=bias)

    def kernel(x, weight, z):
        return norm_forward(x, weight, z, eps, group_size, norm_before_gate)

    def reference(x, weight, z):
        return torch_gated_rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size,
                                      norm_before_gate=norm_before_gate)

    return with_backward(kernel, reference, x, weight, z)


def triton_rms_norm_fn(x, weight, bias, eps=1e-6):
    """The stream's plain RMSNorm (mamba-ssm's `rms_norm_fn` as the block calls it) as one kernel pass."""
    return triton_gated_rmsnorm_fn(x, weight, bias, eps=eps)
