"""Gradients of the CUDA path (mamba-ssm + causal-conv1d kernels and their backward) against the PyTorch path's
autograd on CPU, on the golden models: the training loss on each golden input, every parameter's gradient.

    PYTHONPATH=src python benchmarks/check_gradients.py --golden .golden --out results.jsonl

Compared, per golden case, with the CPU fp32 gradients as the reference:
  - GPU fp32, kernels;          - GPU fp32, PyTorch path (same device, no kernels);
  - GPU fp32, kernels, with gradient checkpointing (the backward recomputes through the kernels);
  - GPU bf16, kernels (bounded by bf16 rounding).
"relative" is ||g - g_ref|| / ||g_ref|| over all parameters together; "worst" is the largest of the same per tensor,
over tensors whose reference gradient is at least 1e-3 of the largest one's (smaller ones are rounding noise).
`mamba_backend` in each row is what the device offers; `path` is what ran.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.mamba2_vamba import Mamba2

BOUNDS = {"fp32": 1e-4, "bf16": 5e-2}


def load(folder: Path, dtype, device):
    model = VambaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype).to(device)
    inputs = load_file(folder / "inputs.safetensors")
    labels = inputs["input_ids"].clone()
    labels[:, :9] = -100  # the prompt
    batch = {key: value.to(device) for key, value in {**inputs, "labels": labels}.items()}
    for name in ("pixel_values", "pixel_values_videos"):
        if name in batch:
            batch[name] = batch[name].to(dtype)
    return model.train(), batch


def gradients(model, batch, kernels: bool, checkpointing: bool = False) -> tuple[float, dict]:
    for module in model.modules():
        if isinstance(module, Mamba2):
            module.use_kernels = kernels
    if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def compare(grads: dict, reference: dict) -> dict:
    assert grads.keys() == reference.keys(), sorted(grads.keys() ^ reference.keys())
    flat = torch.cat([grads[n].flatten() for n in reference])
    flat_reference = torch.cat([reference[n].flatten() for n in reference])
    largest = max(g.norm().item() for g in reference.values())
    per_tensor = {n: ((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items()
                  if g.norm().item() >= 1e-3 * largest}
    worst = max(per_tensor, key=per_tensor.get)
    return {"relative": ((flat - flat_reference).norm() / flat_reference.norm()).item(),
            "worst": per_tensor[worst], "worst_tensor": worst, "tensors": len(reference)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=Path(".golden"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sink = args.out.open("a") if args.out else None
    failures = []
    for case in ("video_short", "video_long", "image"):
        folder = args.golden / case
        model, batch = load(folder, torch.float32, "cpu")
        reference_loss, reference = gradients(model, batch, kernels=False)
        runs = [("fp32", "kernels", dict(kernels=True)), ("fp32", "torch", dict(kernels=False)),
                ("fp32", "kernels+checkpointing", dict(kernels=True, checkpointing=True)),
                ("bf16", "kernels", dict(kernels=True))]
        for dtype_name, path, options in runs:
            model, batch = load(folder, torch.float32 if dtype_name == "fp32" else torch.bfloat16, "cuda")
            backend = model.mamba_backend
            loss, grads = gradients(model, batch, **options)
            row = {"check": "gradients vs CPU fp32", "case": case, "dtype": dtype_name, "path": path,
                   "mamba_backend": backend, "loss": loss, "loss_cpu": reference_loss, **compare(grads, reference)}
            line = json.dumps(row)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
            if options["kernels"] and backend != "mamba-ssm":
                failures.append(f"{case} {dtype_name} {path}: the kernels did not run ({backend})")
            if row["relative"] > BOUNDS[dtype_name]:
                failures.append(f"{case} {dtype_name} {path}: relative {row['relative']:.2e} > {BOUNDS[dtype_name]}")
            del model
    print("check: " + ("all gradients within bounds " + json.dumps(BOUNDS) if not failures else "; ".join(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
