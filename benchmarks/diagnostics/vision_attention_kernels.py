import json, statistics, time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
torch.manual_seed(0)
Fr, L, H, D = 512, 1196, 16, 80
qkv = torch.randn(Fr, L, 3, H, D, device="cuda", dtype=torch.bfloat16)
q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
scale = D ** -0.5
def timed(fn, n=10):
    fn(); torch.cuda.synchronize()
    runs = []
    for _ in range(n):
        t = time.perf_counter(); out = fn(); torch.cuda.synchronize(); runs.append(time.perf_counter() - t)
    return out, statistics.median(runs)
flops = 4 * Fr * H * L * L * D
results = {}
ref = None
for name, backends in (("flash", [SDPBackend.FLASH_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
    try:
        with sdpa_kernel(backends):
            out, s = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
        if ref is None: ref = out.float()
        results[name] = {"ms_per_layer": s * 1e3, "x32_layers_s": 32 * s, "tflops": flops / s / 1e12, "max_abs_vs_flash": (out.float() - ref).abs().max().item()}
    except Exception as e:
        results[name] = {"error": str(e)[:300]}
    print(name, results[name], flush=True)
try:
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention)
    out, s = timed(lambda: flex(q, k, v, scale=scale))
    results["flex"] = {"ms_per_layer": s * 1e3, "x32_layers_s": 32 * s, "tflops": flops / s / 1e12, "max_abs_vs_flash": (out.float() - ref).abs().max().item()}
except Exception as e:
    results["flex"] = {"error": str(e)[:300]}
print("flex", results["flex"], flush=True)
# head_dim padded to 128 with zeros (same result up to rounding), flash
try:
    pad = lambda x: F.pad(x, (0, 128 - D))
    qp, kp, vp = pad(q), pad(k), pad(v)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out, s = timed(lambda: F.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :D])
    results["flash_pad128_kernel_only"] = {"ms_per_layer": s * 1e3, "max_abs_vs_flash": (out.float() - ref).abs().max().item()}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out, s = timed(lambda: F.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :D])
    results["cudnn_pad128_kernel_only"] = {"ms_per_layer": s * 1e3, "max_abs_vs_flash": (out.float() - ref).abs().max().item()}
except Exception as e:
    results["pad"] = {"error": str(e)[:300]}
print(json.dumps(results))
