"""A deliberately naive float64 re-derivation of Vamba's text side from VAMBA_SPEC.md §3: explicit attention
matrices and the Mamba-2 recurrence one token at a time. Used to check the options the golden fixtures do not
cover (cross-attention rotary and layer norm, no alpha balancing, mixer disabled)."""

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(x, positions, config):
    """x (heads, L, d); positions (3, L): M-RoPE, frequency f turned by the row of its section."""
    d = x.shape[-1]
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    section = torch.repeat_interleave(torch.arange(3), torch.tensor(config.mrope_section))
    angles = positions[section].T.double() * inv_freq  # (L, d/2)
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x.chunk(2, -1)
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def attention(w, prefix, x, kv, config, causal, q_pos=None, k_pos=None):
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = (x @ w[prefix + "q_proj.weight"].T + w[prefix + "q_proj.bias"]).view(-1, heads, d).transpose(0, 1)
    k = (kv @ w[prefix + "k_proj.weight"].T + w[prefix + "k_proj.bias"]).view(-1, kv_heads, d).transpose(0, 1)
    v = (kv @ w[prefix + "v_proj.weight"].T + w[prefix + "v_proj.bias"]).view(-1, kv_heads, d).transpose(0, 1)
    if q_pos is not None:
        q, k = rotary(q, q_pos, config), rotary(k, k_pos, config)
    k = k.repeat_interleave(heads // kv_heads, 0)
    v = v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(-1, -2) / d**0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(0, 1).reshape(x.shape[0], -1) @ w[prefix + "o_proj.weight"].T


def mamba2(w, prefix, u, mixer):
    d_inner, heads, p, n, g = mixer.d_inner, mixer.nheads, mixer.headdim, mixer.d_state, mixer.ngroups
    zxbcdt = u @ w[prefix + "in_proj.weight"].T
    z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * g * n, heads], -1)
    kernel = w[prefix + "conv1d.weight"][:, 0]  # (channels, width)
    padded = torch.cat([xbc.new_zeros(kernel.shape[1] - 1, xbc.shape[1]), xbc])
    conv = torch.stack([(padded[t : t + kernel.shape[1]].T * kernel).sum(-1) for t in range(len(xbc))])
    xbc = F.silu(conv + w[prefix + "conv1d.bias"])
    x, B, C = xbc.split([d_inner, g * n, g * n], -1)
    dt = F.softplus(dt + w[prefix + "dt_bias"])
    A = -torch.exp(w[prefix + "A_log"])
    D = w[prefix + "D"]
    state = u.new_zeros(heads, p, n)
    ys = []
    for t in range(len(u)):
        xt = x[t].view(heads, p)
        Bt = B[t].view(g, n).repeat_interleave(heads // g, 0)
        Ct = C[t].view(g, n).repeat_interleave(heads // g, 0)
        state = torch.exp(dt[t] * A)[:, None, None] * state + (dt[t][:, None] * xt)[..., None] * Bt[:, None, :]
        ys.append((state @ Ct[..., None])[..., 0] + D[:, None] * xt)
    y = torch.stack(ys).reshape(len(u), d_inner) * F.silu(z)
    y = rms_norm(y.view(len(u), g, -1), w[prefix + "norm.weight"].view(g, -1), 1e-5).reshape(len(u), d_inner)
    return y @ w[prefix + "out_proj.weight"].T


def reference_logits(state_dict, config, input_ids, visual, visual_positions):
    """input_ids (T,), visual (N, hidden) as the vision tower returns it, visual_positions (3, N)."""
    w = {k: v.double() for k, v in state_dict.items()}
    eps, mixer = config.rms_norm_eps, config.vision_mamba_mixer_config
    h = w["model.embed_tokens.weight"][input_ids]
    text_pos = torch.arange(len(input_ids)).expand(3, -1)
    v = visual.double()
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        s = attention(w, p + "self_attn.", x, x, config, True, text_pos, text_pos)
        if config.cross_attn_use_layer_norm:
            v = rms_norm(v, w[p + "input_layernorm.weight"], eps)
        use_pos = config.cross_attn_use_position_embeddings
        c = attention(w, p + "cross_attn.", x, v, config, False, text_pos if use_pos else None,
                      visual_positions if use_pos else None)
        if config.use_alpha_balancing:
            a = w[p + "alpha"].clamp(0, 1)
            h = h + a * s + (1 - a) * c
        else:
            h = h + s + c
        if mixer.enable:
            v = v + mamba2(w, p + "vision_mixer.mixer.", rms_norm(v, w[p + "vision_mixer.norm.weight"], 1e-5), mixer)
        h = h + mlp(w, p + "mlp.", rms_norm(h, w[p + "post_attention_layernorm.weight"], eps))
    h = rms_norm(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T


def mlp(w, prefix, x):
    gate = F.silu(x @ w[prefix + "gate_proj.weight"].T)
    return (gate * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T
