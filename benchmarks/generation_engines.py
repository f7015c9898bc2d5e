"""Generation engines side by side: tokens/s of each way to sample a batch, against this machine's decode roofline.

    python benchmarks/generation_engines.py                   # the 32M model, batch 32 x 64 new tokens
    python benchmarks/generation_engines.py --size tiny --repeats 2

Engines (all sample at temperature 1 with the tiny tokenizer's chat template, on a random-init model so every
sequence runs the full 64 tokens; the 32M model is the one the PPO benchmark uses):
- `dynamic`: rlhf.generation.generate as PPO calls it: model.generate with a dynamic KV cache, plus the per-step
  log-prob of the sampled token read at the LM head.
- `dynamic_plain`: the same model.generate call without our log-prob hook (what the hook costs).
- `dynamic_bf16`: the same, sampling under bf16 autocast (weights stay fp32): rlhf's `sampling_dtype`.
- `static`: model.generate with a static (preallocated) KV cache (compiled by transformers on GPUs only).
- `static_compiled`: static cache with the decoding forward compiled by torch.compile (transformers' generate
  compiles it on its own on GPUs; on CPU we ask for it). The first call's compile time is reported apart.
- `paged`: transformers' continuous batching (model.generate_batch, paged attention), which TRL's
  `use_transformers_paged` uses; log-probs returned by the engine.

The roofline: each decoding step reads every weight once (and the KV cache), so tokens/s can be at most
batch x memory bandwidth / bytes read per step, and at most matmul FLOP/s / (2 x params) tokens/s by compute; both
are measured here (bandwidth: a large tensor reduction; compute: benchmarks/flops.py's matmul rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, build_model, print_table, write_result  # noqa: E402
from ppo_vs_trl026 import MODEL_30M, ppo_settings, run_ours, stage_outputs  # noqa: E402

PROMPTS = REPO / "data" / "tiny" / "prompts_train.jsonl"
ENGINES = ("dynamic", "dynamic_plain", "dynamic_bf16", "static", "static_compiled", "paged")


def memory_bandwidth(device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of reading a large fp32 tensor once (a sum), best of a few: the rate decoding reads weights at."""
    import torch

    data = torch.ones(int(gib * 2**30 / 4), device=device)
    data.sum()
    best = min(_timed(lambda: data.sum(), device) for _ in range(repeats))
    return data.numel() * 4 / best


def matmul_rate(device, dtype, size: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in the model's dtype on its device."""
    import torch

    left, right = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    left @ right
    return 2 * size**3 / min(_timed(lambda: left @ right, device) for _ in range(repeats))


def _timed(function, device=None) -> float:
    import torch

    started = time.perf_counter()
    function()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def engine_call(engine: str, model, tokenizer, prompt_ids: list[list[int]], new_tokens: int):
    """A function that samples one batch with `engine` and returns the number of response tokens it produced."""
    import torch
    from transformers import CompileConfig, GenerationConfig

    from rlhf.generation import generate, pad_batch, stop_token_ids

    if engine == "static_compiled":  # not an rlhf engine: compilation forced on CPU to see what it would buy
        ids, mask = pad_batch(prompt_ids, tokenizer.pad_token_id, side="left")
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
        config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                                  eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                                  cache_implementation="static", compile_config=compile_config)

        def compiled() -> int:
            with torch.no_grad():
                output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            return int((output[:, ids.shape[1]:] != tokenizer.pad_token_id).sum())

        return compiled
    options = {
        "dynamic": dict(engine="dynamic", return_logprobs=True),  # what a PPO rollout asks for
        "dynamic_plain": dict(engine="dynamic"),
        "dynamic_bf16": dict(engine="dynamic", sampling_dtype=torch.bfloat16),
        "static": dict(engine="static"),
        "paged": dict(engine="paged"),
    }[engine]
    return lambda: int(generate(model, tokenizer, prompt_ids, max_new_tokens=new_tokens, **options).response_mask.sum())


def measure(engine: str, model, tokenizer, prompt_ids, new_tokens: int, repeats: int) -> dict:
    import torch

    call = engine_call(engine, model, tokenizer, prompt_ids, new_tokens)
    torch.manual_seed(0)
    started = time.perf_counter()
    call()  # warm-up: allocations, and compilation for static_compiled
    first = time.perf_counter() - started
    times, tokens = [], []
    for repeat in range(repeats):
        torch.manual_seed(repeat + 1)
        started = time.perf_counter()
        tokens.append(call())
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"first_call_s": first, "seconds": seconds, "tokens": statistics.median(tokens),
            "tokens_per_s": statistics.median(tokens) / seconds}


def ppo_generation(steps: int) -> dict:
    """Our PPO at the 32M model (the PPO benchmark's settings): seconds per iteration and its split, sampling as
    today (fp32) and with sampling_dtype bfloat16 (log-probs then recomputed), runs alternated."""
    settings = ppo_settings(steps, rollout=16, mini=8, epochs=2, new_tokens=32)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_sampling_") as tmp:
        work = Path(tmp)
        sft, reward = stage_outputs("30m", work)
        for name, flags in (("fp32", []), ("bf16_sampling", ["--sampling_dtype", "bfloat16"])):
            runs[name] = run_ours(sft, reward, settings + flags, work, f"30m_{name}", "separate")
            print(f"[bench] ppo {name}: {runs[name]['seconds_per_step']:.2f} s/step, split {runs[name]['split']}",
                  flush=True)
    fp32, bf16 = runs["fp32"], runs["bf16_sampling"]
    return {"settings": settings, "runs": runs,
            "generation_ratio": bf16["split"]["generation"] / fp32["split"]["generation"],
            "step_ratio": bf16["seconds_per_step"] / fp32["seconds_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "30m"], default="30m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--base", type=Path, help="An existing model folder instead of --size (the GPU script's).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="Default: float32 on CPU, bfloat16 on GPU.")
    parser.add_argument("--ppo_steps", type=int, default=5, help="PPO iterations per run for the PPO comparison "
                        "(30m only; 0 skips it).")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/generation_engines_<size>.json).")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.data import load_prompts
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        base = args.base or REPO / "data" / "tiny-base"
        if args.size == "30m" and not args.base:
            base = Path(tmp) / "base_30m"
            build_model(base, **MODEL_30M)
        tokenizer = load_tokenizer(str(base), padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    params = sum(parameter.numel() for parameter in model.parameters())
    prompts = [record["prompt"] for record in load_prompts(str(PROMPTS))][: args.batch]
    prompt_ids = encode_prompts(tokenizer, prompts)

    results = {}
    for engine in args.engines:
        try:
            results[engine] = measure(engine, model, tokenizer, prompt_ids, args.new_tokens, args.repeats)
        except Exception as error:  # an engine this build cannot run is a finding, not a crash
            results[engine] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        print(f"[bench] {engine}: {results[engine]}", flush=True)

    bandwidth = memory_bandwidth(device)
    flops = matmul_rate(device, dtype, size=2048 if device.type == "cpu" else 8192)
    weight_bytes = params * dtype.itemsize
    roofline = {"params": params, "memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflops": flops / 1e9,
                "bandwidth_tokens_per_s": args.batch * bandwidth / weight_bytes,
                "compute_tokens_per_s": flops / (2 * params)}
    roofline["tokens_per_s"] = min(roofline["bandwidth_tokens_per_s"], roofline["compute_tokens_per_s"])

    baseline = results.get("dynamic", {}).get("tokens_per_s")
    rows = []
    for engine, result in results.items():
        if "error" in result:
            rows.append([engine, "failed", "", "", "", result["error"][:60]])
            continue
        rows.append([engine, result["tokens_per_s"], result["first_call_s"],
                     result["tokens_per_s"] / roofline["tokens_per_s"],
                     baseline / result["tokens_per_s"] if baseline else "", ""])
    print(f"\nGeneration engines on {device.type} in {str(dtype).removeprefix('torch.')}: {params / 1e6:.1f}M params, batch {args.batch} x {args.new_tokens} new tokens, "
          f"torch threads {torch.get_num_threads()}; roofline {roofline['tokens_per_s']:.0f} tokens/s "
          f"(bandwidth {roofline['memory_bandwidth_gb_s']:.1f} GB/s -> {roofline['bandwidth_tokens_per_s']:.0f}, "
          f"compute {roofline['matmul_gflops']:.0f} GFLOP/s -> {roofline['compute_tokens_per_s']:.0f})")
    print_table(["engine", "tokens/s", "first call s", "of roofline", "time vs dynamic", "note"], rows)
    if args.size == "30m" and not args.base and args.ppo_steps:
        ppo = ppo_generation(args.ppo_steps)
        print(f"\nPPO at 32M, generation per iteration with bf16 sampling / fp32 sampling: "
              f"{ppo['generation_ratio']:.2f} (whole iteration {ppo['step_ratio']:.2f})")
    else:
        ppo = None
    result = {"ppo": ppo, "settings": {**vars(args), "out": str(args.out), "base": str(base), "device": device.type, "dtype": str(dtype)},
              "engines": results, "roofline": roofline}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        path = args.out
    else:
        path = write_result(f"generation_engines_{args.size}", result)
    print(f"written {path}")


if __name__ == "__main__":
    main()
