"""The Mamba-2 op tables on CPU: which table runs where and what the user is told (availability faked), the PyTorch
scan against its previous algorithm, and our Triton kernels against the PyTorch ops under Triton's interpreter
(TRITON_INTERPRET=1 with Triton installed; the GPU run is tests/test_mamba_kernels_gpu.py)."""

import importlib.util
import os

import pytest
import torch
from conftest import golden_cases
from helpers import golden_inputs, load_golden, relative_error, tiny_model
from mamba_scan_before import ssd_scan_before

import vamba_hf.mamba2_torch_vamba as torch_ops
import vamba_hf.mamba2_vamba as mamba2

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


@pytest.fixture
def availability(monkeypatch):
    """Fakes which kernel tables import: availability(mamba_ssm=..., triton=...)."""

    def set_available(mamba_ssm: bool, triton: bool):
        monkeypatch.setattr(mamba2, "_MAMBA_SSM_ERROR", None if mamba_ssm else "ImportError: no module mamba_ssm")
        monkeypatch.setattr(mamba2, "_CAUSAL_CONV1D_ERROR", None if mamba_ssm else "ImportError: no causal_conv1d")
        monkeypatch.setattr(mamba2, "_TRITON_ERROR", None if triton else "ImportError: no module triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    return set_available


# -- which table runs where -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mamba_ssm, triton, expected", [(True, True, "mamba-ssm"), (True, False, "mamba-ssm"),
                                                         (False, True, "triton"), (False, False, "torch")])
def test_cuda_gets_the_fastest_table_that_runs(availability, mamba_ssm, triton, expected):
    availability(mamba_ssm, triton)
    mixer = tiny_model().model.layers[0].vision_mixer.mixer
    assert mixer.backend(CUDA) == expected
    assert mixer.backend(CPU) == "torch"


def test_a_requested_table_runs_or_is_refused_with_the_reason(availability):
    availability(mamba_ssm=True, triton=True)
    mixer = tiny_model().model.layers[0].vision_mixer.mixer
    for name in ("triton", "torch", "mamba-ssm"):
        mixer.backend_request = name
        assert mixer.backend(CUDA) == name
    mixer.backend_request = "triton"
    with pytest.raises(RuntimeError, match="'triton' cannot run: tensors are on cpu"):
        mixer.backend(CPU)
    mixer.backend_request = "cuda-kernels"
    with pytest.raises(ValueError, match="Unknown Mamba-2 backend 'cuda-kernels'; choose one of mamba-ssm, triton"):
        mixer.backend(CUDA)
    mixer.backend_request, mixer.use_kernels = "triton", False
    assert mixer.backend(CUDA) == "torch"


def test_the_interpreter_runs_the_triton_table_on_cpu_only_when_asked(availability, monkeypatch):
    availability(mamba_ssm=False, triton=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mamba2.triton_unavailable_reason(CPU) is None
    assert mamba2.select_ops(CPU).name == "torch"
    assert mamba2.select_ops(CPU, "triton").name == "triton"


def warnings_of(model, monkeypatch):
    import vamba_hf.modeling_vamba as modeling

    messages = []
    monkeypatch.setattr(modeling.logger, "warning", lambda message, *a, **k: messages.append(message))
    model._check_kernels(CUDA)
    model._check_kernels(CUDA)
    return messages


def test_cuda_without_any_kernels_warns_once_with_both_reasons_and_the_fixes(availability, monkeypatch):
    availability(mamba_ssm=False, triton=False)
    [message] = warnings_of(tiny_model(), monkeypatch)
    assert "mamba-ssm is not usable (ImportError: no module mamba_ssm)" in message
    assert "Triton is not usable (ImportError: no module triton)" in message
    assert "PyTorch path" in message and "ships Triton" in message and "pip install 'vamba-hf[cuda]'" in message


@pytest.mark.parametrize("mamba_ssm, triton", [(False, True), (True, False)])
def test_no_warning_where_a_kernel_table_runs(availability, monkeypatch, mamba_ssm, triton):
    availability(mamba_ssm, triton)
    assert warnings_of(tiny_model(), monkeypatch) == []
    assert mamba2.missing_kernels_warning(CPU) is None


def test_the_op_tables_share_the_kernels_signatures():
    import inspect

    for field in ("chunk_scan", "causal_conv1d", "gated_rmsnorm"):
        expected = inspect.signature(getattr(mamba2.TORCH_OPS, field))
        assert inspect.signature(getattr(mamba2.TRITON_OPS, field)) == expected, field


# -- the PyTorch scan against its previous algorithm --------------------------------------------------------------


def scan_inputs(batch=2, length=45, heads=4, headdim=8, groups=2, state=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, headdim, generator=generator)
    dt = torch.rand(batch, length, heads, generator=generator) * 0.5
    A = -torch.rand(heads, generator=generator) * 2 - 0.1
    B = torch.randn(batch, length, groups, state, generator=generator)
    C = torch.randn(batch, length, groups, state, generator=generator)
    initial = torch.randn(batch, heads, headdim, state, generator=generator)
    return x, dt, A, B, C, initial


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_torch_scan_equals_its_previous_algorithm(chunk_size):
    x, dt, A, B, C, initial = scan_inputs()
    seq_idx = torch.tensor([[0] * 20 + [1] * 10 + [2] * 15, [0] * 30 + [1] * 13 + [2] * 2])
    for kwargs in ({}, {"initial_state": initial}, {"seq_idx": seq_idx, "initial_state": initial}):
        y, final = torch_ops.ssd_scan_torch(x, dt, A, B, C, chunk_size, **kwargs)
        y_before, final_before = ssd_scan_before(x, dt, A, B, C, chunk_size, **kwargs)
        assert relative_error(y, y_before) <= 1e-6 and relative_error(final, final_before) <= 1e-6


def test_torch_scan_takes_long_segments_a_group_of_chunks_at_a_time(monkeypatch):
    x, dt, A, B, C, initial = scan_inputs(length=100)
    whole, final = torch_ops.ssd_scan_torch(x, dt, A, B, C, 8, initial_state=initial)
    monkeypatch.setattr(torch_ops, "TORCH_SCAN_BLOCK_BYTES", 4 * 4 * 8 * 8 * 2 * 3)  # 3 chunks' decays
    sizes = []
    original = torch_ops.segment_sum
    monkeypatch.setattr(torch_ops, "segment_sum", lambda t: sizes.append(t.shape[-2]) or original(t))
    grouped, final_grouped = torch_ops.ssd_scan_torch(x, dt, A, B, C, 8, initial_state=initial)
    assert sizes[:-1] == [3, 3, 3, 3, 1]  # 13 chunks; the last call is the across-chunk pass
    assert torch.equal(grouped, whole) and torch.equal(final_grouped, final)


@pytest.mark.parametrize("case", golden_cases())
def test_torch_path_equals_its_previous_output_on_golden_fixtures(golden_dir, case, monkeypatch):
    model, _ = load_golden(golden_dir / case, "sdpa")
    input_ids, attention_mask, visual = golden_inputs(golden_dir / case)

    def logits():
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **visual).logits

    now = logits()
    monkeypatch.setattr(torch_ops, "ssd_scan_torch", ssd_scan_before)
    before = logits()
    assert relative_error(now, before) <= 1e-6
    assert torch.equal(now.argmax(-1), before.argmax(-1))


# -- our Triton kernels under the interpreter --------------------------------------------------------------------

interpreter_only = pytest.mark.skipif(not INTERPRETER, reason="needs Triton and TRITON_INTERPRET=1 (the kernels "
                                                                "run on CPU only in Triton's interpreter)")


def scan_call(table, tensors, chunk_size, seq_idx):
    x, dt, A, B, C, D, dt_bias, initial = tensors
    return table.chunk_scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial,
                            seq_idx=seq_idx, dt_softplus=True, return_final_states=True)


@interpreter_only
@pytest.mark.parametrize("chunk_size", [16, 7])
def test_triton_scan_and_gradients_equal_the_torch_path(chunk_size):
    x, dt, A, B, C, initial = scan_inputs(length=45)
    D, dt_bias = torch.randn(4), torch.randn(4) * 0.1
    seq_idx = torch.tensor([[0] * 20 + [1] * 10 + [2] * 15, [0] * 30 + [1] * 13 + [2] * 2], dtype=torch.int32)
    for ids in (None, seq_idx):
        leaves = {name: [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias, initial)]
                  for name in ("triton", "torch")}
        outputs = {name: scan_call(mamba2.OP_TABLES[name], leaves[name], chunk_size, ids) for name in leaves}
        for got, expected in zip(outputs["triton"], outputs["torch"]):
            assert relative_error(got, expected) <= 1e-5
        weights = [torch.randn_like(t) for t in outputs["torch"]]
        for name in leaves:
            sum((out * w).sum() for out, w in zip(outputs[name], weights)).backward()
        for got, expected in zip(leaves["triton"], leaves["torch"]):
            assert relative_error(got.grad, expected.grad) <= 1e-5


@interpreter_only
def test_triton_conv_and_norms_equal_the_torch_path():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 45, 24, generator=generator).transpose(1, 2)
    weight, bias, initial = torch.randn(24, 4), torch.randn(24), torch.randn(2, 24, 3)
    seq_idx = torch.tensor([[0] * 20 + [1] * 25, [0] * 45], dtype=torch.int32)
    for kwargs in ({}, {"initial_states": initial}, {"seq_idx": seq_idx}):
        got = mamba2.TRITON_OPS.causal_conv1d(x, weight, bias, activation="silu", **kwargs)
        assert relative_error(got, mamba2.TORCH_OPS.causal_conv1d(x, weight, bias, activation="silu", **kwargs)) <= 1e-6
    y, z, w = torch.randn(2, 45, 32), torch.randn(2, 45, 32), torch.randn(32)
    for before in (True, False):
        kwargs = dict(z=z, eps=1e-5, group_size=16, norm_before_gate=before)
        got = mamba2.TRITON_OPS.gated_rmsnorm(y, w, None, **kwargs)
        assert relative_error(got, mamba2.TORCH_OPS.gated_rmsnorm(y, w, None, **kwargs)) <= 1e-6


@interpreter_only
def test_tiny_model_on_the_triton_table_equals_the_torch_path():
    model = tiny_model()
    mixers = [m for m in model.modules() if isinstance(m, mamba2.Mamba2)]
    from helpers import prompt, video_pixels

    pixels, grid = video_pixels(2, 4, 4)
    logits = {}
    for name in ("triton", "torch"):
        for mixer in mixers:
            mixer.backend_request = name
        assert model.mamba_backend == name
        with torch.no_grad():
            logits[name] = model(input_ids=prompt(1, 3)[None], pixel_values_videos=pixels,
                                 video_grid_thw=grid).logits
    assert relative_error(logits["triton"], logits["torch"]) <= 1e-5


# -- the benchmark's CPU smoke run ----------------------------------------------------------------------------------


def test_backends_benchmark_tiny(tmp_path):
    import math

    from test_benchmarks import records, run_script

    run_script("bench_mamba_backends.py", tmp_path, "--tiny", "--frames", "4", "--backends", "torch")
    rows = records(tmp_path, "bench_mamba_backends.py")
    prefill = [r for r in rows if r.get("section") == "prefill"]
    train = [r for r in rows if r.get("section") == "train"]
    assert [(r["backend"], r["frames"]) for r in prefill] == [("torch", 4)]
    assert [(r["backend"], r["frames"]) for r in train] == [("torch", 8)]
    assert all(math.isfinite(r["first_token_s"]) and len(r["runs_s"]) == 2 for r in prefill)
    assert all(math.isfinite(r["step_s"]) and r["peak_gib"] is None for r in train)


def test_backends_benchmark_refuses_a_table_that_cannot_run(tmp_path):
    from test_benchmarks import run_script

    result = run_script("bench_mamba_backends.py", tmp_path, "--tiny", "--backends", "mamba-ssm", expect_rc=1)
    assert result.stderr.strip().splitlines() == [
        "--backends: 'mamba-ssm' cannot run here (tensors are on cpu); drop it or leave --backends out"]
    result = run_script("bench_mamba_backends.py", tmp_path, "--tiny", "--backends", "cuda", expect_rc=1)
    assert result.stderr.strip().splitlines() == ["--backends: unknown 'cuda'; choose from mamba-ssm, triton, torch"]
