"""The small building blocks every part of Vamba uses: RMSNorm, the SwiGLU MLP, rotary helpers, eager attention,
the SDPA backend choice, and the compiled passes of elementwise chains (owned by the modules that run them).

They are owned here rather than imported from transformers' model files (whose private classes move between
releases); names and parameter shapes are Qwen2's, so the official checkpoint loads unchanged.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

logger = logging.get_logger(__name__)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm, in fp32: weight * x / sqrt(mean(x^2) + eps)."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


class VambaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (Qwen2's): weight * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        # At inference on CUDA, one kernel instead of six to eight: a decoding step is a chain of small kernels whose
        # count, not their bytes, sets its time (BENCHMARKS.md). Shapes start static (the hidden size stays so) and
        # turn dynamic where they vary (the text length).
        self.fused_norm = FusedOnCuda(rms_norm, dynamic=None, inference_only=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fused_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class VambaTextMLP(nn.Module):
    """The decoder layers' SwiGLU MLP: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., L, head_dim) in fp32 by angles given as cos/sin broadcastable to it."""
    # cos/sin are upcast here too: FSDP2 casts a wrapped layer's float inputs to bf16 in the forward pass but not
    # when activation checkpointing recomputes it, and the two must save tensors of one dtype.
    rotated = x.float() * cos.float() + rotate_half(x.float()) * sin.float()
    return rotated.to(x.dtype)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, kv_heads, L, d) -> (b, kv_heads * n_rep, L, d), each K/V head repeated for its query heads."""
    batch, kv_heads, length, dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, dim)


def eager_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling: float,
                            dropout: float = 0.0, **kwargs):
    """Attention with explicit weights, in transformers' attention-interface form: (b, L, h, d) output and the
    (b, h, q, k) softmax weights. `attention_mask` is additive; `is_causal` is expressed by the mask here."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def attention_mask_for(keep: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(b, q, k) bool of allowed pairs -> the mask format of the attention implementation, (b, 1, q, k): bool for
    SDPA, additive for eager (flash-attention takes SDPA's where Vamba masks keys of another length)."""
    keep = keep | ~keep.any(-1, keepdim=True)  # a fully masked row (left padding) attends everywhere, harmlessly
    keep = keep[:, None]
    if implementation == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


def custom_self_mask(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A caller's 4D mask (b, 1, q, k) in the implementation's format: bool (True attends) as `attention_mask_for`
    formats it, floats (added to the scores) as they are."""
    if mask.dtype == torch.bool:
        return attention_mask_for(mask[:, 0], implementation, dtype)
    return mask.to(dtype)


def attention_interface(implementation: str):
    if implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def sdpa_backends():
    """SDPA without cuDNN attention: torch 2.11 tries it first on Hopper, where it plans anew for every new key length
    (every decoding step), slower than flash on Vamba's cross-attention shapes (BENCHMARKS.md)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def vision_sdpa_backends():
    """SDPA with cuDNN attention where torch tries it first (Hopper): the vision tower's shapes repeat within a
    video, so its plans are reused, and there it is faster than flash (BENCHMARKS.md)."""
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _compile_error_types() -> tuple[type, ...]:
    """The exceptions by which torch.compile says it cannot compile on this machine: the backend failed (Inductor,
    Triton), Triton is missing or the GPU is too old for it, no working C++ compiler."""
    from torch._dynamo import exc as dynamo_errors

    types = [dynamo_errors.BackendCompilerFailed]
    try:
        from torch._inductor import exc as inductor_errors
    except ImportError:  # a torch build without Inductor: its failures come as BackendCompilerFailed
        return tuple(types)
    for name in ("TritonMissing", "GPUTooOldForTriton", "InvalidCxxCompiler", "CppCompileError"):
        if hasattr(inductor_errors, name):
            types.append(getattr(inductor_errors, name))
    return tuple(types)


def compile_unavailable(error: BaseException) -> bool:
    """Whether `error` says that compiling is impossible here (run eager instead), as opposed to a failure of the
    computation itself (out of memory, a bad input), which must reach the caller."""
    if not isinstance(error, _compile_error_types()):
        return False
    inner = getattr(error, "inner_exception", None)
    return not isinstance(inner, torch.OutOfMemoryError)


def has_quantized_weights(module: nn.Module) -> bool:
    """Whether a parameter of `module` is of a quantization library's type (torchao's tensor subclasses,
    bitsandbytes' Int8Params / Params4bit) rather than a plain tensor."""
    return any(type(parameter) not in (torch.Tensor, nn.Parameter) for parameter in module.parameters())


class CompileState:
    """One model's compiled functions (torch.compile's, one per function run by its fused passes) and whether
    compiling works: the first pass to find it unavailable turns them all eager, with one warning. Each model has
    its own (`share_compile_state`)."""

    def __init__(self):
        self.failed, self.compiled = False, {}

    def compiled_function(self, fn, dynamic: Optional[bool]):
        if (fn, dynamic) not in self.compiled:
            self.compiled[fn, dynamic] = torch.compile(fn, dynamic=dynamic)
        return self.compiled[fn, dynamic]

    def __getstate__(self) -> dict:
        # A copied or pickled model compiles anew (a compiled function does not pickle).
        return {"failed": self.failed, "compiled": {}}


class FusedOnCuda:
    """`fn` compiled (torch.compile) for tensors on `device_type` (CUDA), so that a chain of elementwise ops makes one
    pass over memory instead of one each; eager on other devices, or for good once compiling is found unavailable.
    The module that runs it owns it (a plain attribute: no parameter, no submodule, nothing in the state dict); the
    compiled function is its model's (`CompileState`).

    Its first tensor argument decides the device. `dynamic` is torch.compile's. `inference_only` compiles only while
    autograd is off: training keeps the eager path, whose saved tensors activation checkpointing and FSDP rely on.
    `fn` takes its module as an argument (no bound method), so that one compiled graph serves every module of a model
    that runs it."""

    def __init__(self, fn, device_type: str = "cuda", dynamic: Optional[bool] = True, inference_only: bool = False):
        self.fn, self.device_type, self.dynamic = fn, device_type, dynamic
        self.inference_only = inference_only
        self.state = CompileState()

    @property
    def failed(self) -> bool:
        return self.state.failed

    def compiles(self, *args) -> bool:
        """Whether a call with `args` first runs the compiled `fn`. Not while an outer torch.compile traces the model:
        it fuses `fn` itself. Not for a module with quantized weights among `args`: tracing a quantization library's
        weight types compiles anew for every layer (minutes for a 7B model), and their kernels are already fused."""
        if first_tensor(args).device.type != self.device_type or self.state.failed or torch.compiler.is_compiling():
            return False
        if any(isinstance(arg, nn.Module) and has_quantized_weights(arg) for arg in args):
            return False
        return not (self.inference_only and torch.is_grad_enabled())

    def __call__(self, *args):
        if not self.compiles(*args):
            return self.fn(*args)
        compiled = None
        try:
            # Raises at once where this Python or platform has no torch.compile.
            compiled = self.state.compiled_function(self.fn, self.dynamic)
            return compiled(*args)
        except Exception as error:
            if compiled is not None and not compile_unavailable(error):
                raise
            self.state.failed = True
            logger.warning(f"Vamba: torch.compile is unavailable ({type(error).__name__}: {error}); running eager.")
        return self.fn(*args)


def first_tensor(args: tuple) -> torch.Tensor:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
    raise TypeError("a fused pass takes at least one tensor")


def share_compile_state(model: nn.Module) -> None:
    """One `CompileState` for all the fused passes of `model`'s modules: one compiled function per function, and
    where compiling is unavailable the first pass to find it so turns the model's passes eager with one warning;
    another model keeps its own."""
    state = CompileState()
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, FusedOnCuda):
                value.state = state
