"""Same call A/B: greedy decoding at 1024 frames (7B, random weights, bf16) with the CUDA-graph step as it is, against
the same step with `decode_step` compiled by torch.compile (Inductor fuses the elementwise work between the GEMMs
and attention) before the graph captures it. Each variant prefills anew from the same inputs; step 0's logits (the
same cache state) and the greedy ids are compared."""
import json, time, torch
import bench_vamba
from bench_utils import output_cache
from vamba_hf.modeling_vamba import VambaForConditionalGeneration

setup = bench_vamba.seven_b_setup({})
model = bench_vamba.build(setup)
ids, pixels, grid = bench_vamba.video_inputs(setup, 1024)
record, results = {}, {}
with torch.inference_mode():
    for name, mode in (("graph", None), ("graph + compiled step", "default"),
                       ("graph + compiled step, max-autotune", "max-autotune-no-cudagraphs")):
        if mode is not None:
            torch._dynamo.reset()
            step = VambaForConditionalGeneration.decode_step.__get__(model)
            model.decode_step = torch.compile(step, dynamic=False, mode=mode)
        out = model(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid, use_cache=True, logits_to_keep=1)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        del out
        started = time.perf_counter()
        first = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].float()
        torch.cuda.synchronize()
        first_step_s = time.perf_counter() - started
        ms, tokens, _ = bench_vamba.decode(model, cache, first.argmax(-1, keepdim=True), steps=48, warmup=4)
        results[name] = (first, tokens)
        record[name] = {"decode_ms": ms, "first_step_s": first_step_s}
        print(name, record[name], flush=True)
        del cache
        torch.cuda.empty_cache()
reference_logits, reference_tokens = results["graph"]
for name, (logits, tokens) in results.items():
    record[name]["step0_logits_relative_difference"] = ((logits - reference_logits).norm()
                                                        / reference_logits.norm()).item()
    record[name]["same_ids_as_graph"] = int((tokens == reference_tokens).sum())
print(json.dumps(record))
