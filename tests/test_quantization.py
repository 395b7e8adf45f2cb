"""Quantized loading through transformers' own configs and `trust_remote_code`: torchao int8 weight-only on the CPU
(load, generate, save and reload), what Vamba keeps in full precision, the quantized Mamba-2 projections called as
modules, and the one-line errors that name the fix when a quantization needs a GPU or a package."""

import importlib
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import golden_cases
from convert_helpers import (auto_model_class, generate_golden, golden_generated_ids, golden_generation_inputs,
                             make_source)
from test_benchmarks import records, run_script
from test_space_files import app  # noqa: F401 - the Space app with a stand-in for gradio
from torch import nn
from torch.nn import functional as F

from vamba_hf.convert import convert_checkpoint
from vamba_hf.mamba2_vamba import kernels_unavailable_reason
from vamba_hf.quantization import PACKAGES, QUANTIZATIONS, check_supported, quantization_config

CPU = torch.device("cpu")
# What Vamba declares unquantized (VambaPreTrainedModel._keep_in_fp32_modules), by parameter name ending.
FULL_PRECISION_ENDINGS = ("conv1d.weight", "conv1d.bias", "A_log", ".D", "dt_bias")


def torchao_or_skip():
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("TORCHAO NOT INSTALLED: quantized loading was NOT tested (pip install -e '.[quantize]')")


class ConvertedCases(dict):
    """Golden cases converted into folders that load with trust_remote_code, each on first use."""

    def __init__(self, golden_dir, root):
        super().__init__()
        self.golden_dir, self.root = golden_dir, root

    def __missing__(self, case):
        source = make_source(self.golden_dir / case, self.root / f"official-{case}")
        self[case] = convert_checkpoint(source, self.root / case, log=lambda message: None).destination
        return self[case]


@pytest.fixture(scope="module")
def hub_folders(golden_dir, tmp_path_factory):
    return ConvertedCases(golden_dir, tmp_path_factory.mktemp("quantization"))


def load(folder, quantization=None, dtype=torch.float32, **kwargs):
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, CPU)
    return auto_model_class().from_pretrained(folder, trust_remote_code=True, dtype=dtype, **kwargs).eval()


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is a quantized tensor (torchao's subclasses), not a plain one."""
    return type(weight) not in (torch.Tensor, nn.Parameter)


def relative_error(ours, ref) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def only_remote_code(monkeypatch):
    """The Auto classes as in a process that never imported vamba_hf: an earlier test's `from vamba_hf import ...`
    registers model_type "vamba", and transformers then loads the package's classes instead of the folder's code."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "vamba", raising=False)
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModel"):
        mapping = getattr(getattr(transformers, auto_name, None), "_model_mapping", None)
        for config_class in [key for key in getattr(mapping, "_extra_content", {}) if key.__name__ == "VambaConfig"]:
            monkeypatch.delitem(mapping._extra_content, config_class)


@pytest.mark.parametrize("case", golden_cases())
def test_int8_weights_load_through_remote_code_and_generate_the_fp32_tokens(golden_dir, hub_folders, case,
                                                                            only_remote_code):
    torchao_or_skip()
    model = load(hub_folders[case], "int8")
    assert type(model).__module__.startswith("transformers_modules")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert [name for name, module in linears.items() if not is_quantized(module.weight)] == ["lm_head"]
    assert len(linears) == 50

    reference = load(hub_folders[case])
    inputs = golden_generation_inputs(golden_dir / case)
    with torch.no_grad():
        logits, reference_logits = model(**inputs).logits, reference(**inputs).logits
    # int8 with one scale per output channel: about 0.6% on these models.
    assert relative_error(logits, reference_logits) < 0.02
    assert torch.equal(generate_golden(model, golden_dir / case), golden_generated_ids(golden_dir / case))


def test_the_declared_parameters_stay_full_precision_whatever_skip_list_the_user_gives(hub_folders):
    torchao_or_skip()
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    # A skip list of the user's own, and float16, where transformers upcasts what a model keeps in fp32.
    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head"])
    model = load(hub_folders["video_short"], dtype=torch.float16, quantization_config=config)
    kept = {name: param for name, param in model.named_parameters() if name.endswith(FULL_PRECISION_ENDINGS)}
    assert len(kept) == 3 * 5  # three layers' Mamba-2 blocks
    for name, param in kept.items():
        assert param.dtype == torch.float32 and not is_quantized(param), name
    mixer = model.model.layers[0].vision_mixer.mixer
    assert is_quantized(mixer.in_proj.weight) and is_quantized(mixer.out_proj.weight)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16


class Int8StorageLinear(nn.Module):
    """A Linear that keeps its weight as int8 with one scale per row, as bitsandbytes' 8-bit layers do: its
    `weight.dtype` is int8, so only calling the module computes with it correctly."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((linear.weight.detach() / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def test_quantized_mamba_projections_are_called_as_modules(golden_dir, hub_folders):
    model = load(hub_folders["video_long"])
    inputs = golden_generation_inputs(golden_dir / "video_long")
    with torch.no_grad():
        reference = model(**inputs).logits
        for layer in model.model.layers:
            mixer = layer.vision_mixer.mixer
            mixer.in_proj, mixer.out_proj = Int8StorageLinear(mixer.in_proj), Int8StorageLinear(mixer.out_proj)
        logits = model(**inputs).logits
    assert relative_error(logits, reference) < 0.02


def test_a_saved_int8_model_reloads_quantized_with_the_same_logits(golden_dir, hub_folders, tmp_path):
    torchao_or_skip()
    model = load(hub_folders["video_short"], "int8")
    inputs = golden_generation_inputs(golden_dir / "video_short")
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x writes torchao's int8 weights only as a pickle (safe_serialization=False), which vamba-hf
        # never writes nor reads.
        with pytest.raises(ValueError, match="not serializable"):
            model.save_pretrained(tmp_path / "int8")
        pytest.skip("transformers 4.x cannot save torchao int8 weights as safetensors: round trip checked on 5.x")
    model.save_pretrained(tmp_path / "int8")
    reloaded = load(tmp_path / "int8")
    assert is_quantized(reloaded.model.layers[0].vision_mixer.mixer.in_proj.weight)
    saved_config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert saved_config["quantization_config"]["quant_method"] == "torchao"
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_int8_video_state_static_step_and_beams(golden_dir, hub_folders, tmp_path):
    torchao_or_skip()
    model = load(hub_folders["video_short"], "int8")
    # The folder's remote code, whose VideoState the model checks for.
    remote_module = type(model).__module__.rsplit(".", 1)[0] + ".video_state_vamba"
    load_video_state = importlib.import_module(remote_module).load_video_state
    inputs = golden_generation_inputs(golden_dir / "video_short")
    options = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = model.generate(**inputs, **options)

    state = model.encode_video(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    state.save(tmp_path / "state.safetensors")
    state = load_video_state(tmp_path / "state.safetensors", model)
    text = {name: inputs[name] for name in ("input_ids", "attention_mask")}
    assert torch.equal(model.generate(**text, video_state=state, **options), expected)

    model.static_decode_step_off_cuda = True  # the CUDA graph's step, run eagerly
    static = model.generate(**inputs, return_dict_in_generate=True, **options)
    assert (getattr(static, "cache", None) or static.past_key_values).decode_graph is not None
    assert torch.equal(static.sequences, expected)
    beams = model.generate(**inputs, num_beams=2, num_return_sequences=2, **options)
    assert beams.shape == (2, expected.shape[1])


@pytest.mark.parametrize("name", sorted(set(QUANTIZATIONS) - {"int8"}))
def test_a_gpu_quantization_on_the_cpu_names_the_fix(name, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda package, *args: object())
    with pytest.raises(ValueError, match=rf"--quantize {name} runs on CUDA GPUs only .* use --quantize int8"):
        check_supported(name, CPU)


@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_a_missing_package_is_named_with_its_install_line(name, monkeypatch):
    real_find_spec = importlib.util.find_spec
    package = "bitsandbytes" if name.startswith("bnb") else "torchao"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *args: None if module == package else real_find_spec(module, *args))
    with pytest.raises(ImportError, match=rf"needs {package}, which is not installed: pip install {package}$"):
        check_supported(name, CPU)


def test_bitsandbytes_through_from_pretrained_names_what_is_missing(hub_folders):
    """transformers' own check, as a user calling from_pretrained directly meets it."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        pytest.skip("bitsandbytes and a GPU are present: nothing is missing")
    with pytest.raises((ImportError, RuntimeError, ValueError), match=r"(?i)bitsandbytes|gpu|cuda"):
        load(hub_folders["video_short"], quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vamba_hf", *args], capture_output=True, text=True, timeout=600)


def test_cli_generates_with_int8_weights_on_the_demo_model():
    torchao_or_skip()
    done = run_cli("generate", "--quantize", "int8", "--max-new-tokens", "3", "--prompt", "Hi")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8 weights" in done.stderr


def test_cli_float8_on_the_cpu_is_one_line_naming_the_fix():
    done = run_cli("generate", "--quantize", "float8", "--device", "cpu", "--max-new-tokens", "1")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()[-1:]
    fix = "--quantize int8" if importlib.util.find_spec("torchao") else "pip install torchao"
    assert line.startswith("vamba-hf: error: --quantize float8 ") and fix in line
    assert "Traceback" not in done.stderr


def test_quantize_saves_a_converted_folder_with_int8_weights_and_a_card_that_says_so(golden_dir, hub_folders,
                                                                                      tmp_path):
    torchao_or_skip()
    source, destination = hub_folders["video_short"], tmp_path / "int8"
    assert "- **Precision:** the source's float32 weights, unquantized." in (source / "README.md").read_text()
    done = run_cli("quantize", str(source), str(destination), "--quantize", "int8", "--device", "cpu")
    if int(transformers.__version__.split(".")[0]) < 5:
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
            f"vamba-hf: error: transformers {transformers.__version__} cannot save int8 weights")
        assert "pip install -U 'transformers>=5.1'" in done.stderr
        assert sorted(path.name for path in tmp_path.iterdir()) == []  # no folder, no partial one
        return
    assert done.returncode == 0, done.stderr[-2000:]
    card = (destination / "README.md").read_text()
    assert f"- **Precision:** {QUANTIZATIONS['int8']}, saved by `vamba-hf quantize`" in card
    assert (destination / "tokenizer.json").is_file() and (destination / "modeling_vamba.py").is_file()
    model = load(destination)
    assert is_quantized(model.model.layers[0].mlp.up_proj.weight) and not is_quantized(model.lm_head.weight)
    case = golden_dir / "video_short"
    assert torch.equal(generate_golden(model, case), golden_generated_ids(case))

    again = run_cli("quantize", str(source), str(destination), "--quantize", "int8", "--device", "cpu")
    assert again.returncode == 2
    assert again.stderr.strip().endswith("exists: give a new folder to write the quantized model to.")


def test_bench_quantized_tiny(tmp_path):
    torchao_or_skip()
    run_script("bench_quantized.py", tmp_path, "--tiny")
    rows = records(tmp_path, "bench_quantized.py")
    for model in ("vamba", "qwen2-vl"):
        timed = {r["precision"]: r for r in rows if r.get("model") == model and "first_token_s" in r}
        assert set(timed) == {"fp32", "int8"} and all(r["decode_ms"] > 0 for r in timed.values())
        assert timed["int8"]["greedy_agreement_vs_unquantized"] >= 0
        (errors,) = [r for r in rows if r.get("model") == model and "vision_relative_vs_unquantized" in r]
        for stage in ("vision", "hidden_1"):
            assert 0 < errors[f"{stage}_relative_vs_unquantized"] < 0.05


# -- on a CUDA GPU -------------------------------------------------------------------------------------------------

# relative error of the prefill logits against bf16
GPU_LOGITS_BOUNDS = {"int8": 0.05, "int4": 0.2, "float8": 0.1, "bnb-int8": 0.05, "bnb-nf4": 0.2}
# NF4's error on this tiny model (8.5% of the logits' norm on an H100) is larger than the gap between its two best
# first tokens; the others keep bf16's first token.
FIRST_TOKEN_AS_BF16 = {"int8", "int4", "float8", "bnb-int8"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(GPU_LOGITS_BOUNDS))
def test_gpu_quantization_generates_with_the_kernels_and_the_graph_step(golden_dir, hub_folders, name):
    if importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{PACKAGES[name]} is not installed")
    device = torch.device("cuda")
    if kernels_unavailable_reason(device):
        pytest.skip(f"the Mamba-2 kernels are not usable: {kernels_unavailable_reason(device)}")
    if name == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    case = golden_dir / "video_short"
    inputs = {key: value.to(device) for key, value in golden_generation_inputs(case).items()}
    options = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                   output_logits=True)
    results = {}
    for quantization in (None, name):
        kwargs = {} if quantization is None else {"quantization_config": quantization_config(quantization, device)}
        model = auto_model_class().from_pretrained(hub_folders["video_short"], trust_remote_code=True,
                                                   dtype=torch.bfloat16, device_map="cuda", **kwargs).eval()
        assert model.mamba_backend == "mamba-ssm"
        generated = model.generate(**inputs, **options)
        cache = getattr(generated, "cache", None) or generated.past_key_values
        assert cache.decode_graph is not None  # the decoding steps replayed the CUDA graph
        results[quantization] = generated
    reference, quantized = results[None], results[name]
    error = relative_error(quantized.logits[0].float(), reference.logits[0].float())
    print(f"{name}: first-token logits relative error against bf16 {error:.4f}; ids {quantized.sequences.tolist()} "
          f"against {reference.sequences.tolist()}")
    assert error < GPU_LOGITS_BOUNDS[name]
    if name in FIRST_TOKEN_AS_BF16:
        assert torch.equal(quantized.sequences[:, :inputs["input_ids"].shape[1] + 1],
                           reference.sequences[:, :inputs["input_ids"].shape[1] + 1])


def test_the_space_loads_the_weights_its_variable_names(app, monkeypatch):
    """The Space (space/app.py) with `VAMBA_QUANTIZE=int8`: the embedded demo model comes with int8 weights."""
    torchao_or_skip()
    monkeypatch.setenv("VAMBA_QUANTIZE", "int8")
    loaded, _ = app.load(None)
    assert loaded.quantization == "int8"
    linears = {name: module for name, module in loaded.model.named_modules() if isinstance(module, nn.Linear)}
    assert all(is_quantized(module.weight) for name, module in linears.items() if name != "lm_head")
