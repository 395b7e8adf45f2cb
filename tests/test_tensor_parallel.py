"""Tensor parallelism as transformers applies it (`from_pretrained(..., tp_plan="auto")` with the config's
`base_model_tp_plan`): two CPU processes over gloo give the logits and greedy ids of one process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from tp_inputs import GREEDY, inputs

from vamba_hf import VambaForConditionalGeneration

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed for the CPU tensor-parallel run", allow_module_level=True)

TESTS = Path(__file__).resolve().parent


def test_every_entry_of_the_plan_names_layers_of_the_model():
    model = tiny_model()
    names = [name for name, _ in model.named_modules()]
    plan = model.tp_plan
    assert plan, "no tensor-parallel plan"
    for pattern in plan:
        regex = pattern.replace(".", r"\.").replace("*", r"\d+")
        assert any(re.fullmatch(regex, name) for name in names), pattern


def test_two_tensor_parallel_processes_give_the_logits_of_one(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        logits = model(**inputs()).logits
        ids = model.generate(**inputs(), **GREEDY)
    out = tmp_path / "tp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "tp_worker.py"), str(tmp_path / "model"), str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = torch.load(out)
    assert result["world_size"] == 2
    assert result["q_rows"] == model.model.layers[0].self_attn.q_proj.weight.shape[0] // 2  # really sharded
    torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(result["ids"], ids)
