"""Policy evaluation: sample responses to held-out prompts and score them.

    rlhf eval-policy --policy runs/tiny/dpo --prompts data/tiny/prompts_test.jsonl \
        --gold_reward rlhf.tiny.task:gold_reward
    rlhf eval-policy --policy runs/tiny/dpo runs/tiny/ppo --reference runs/tiny/sft --reward_model runs/tiny/reward \
        --prompts data/tiny/prompts_test.jsonl --out runs/tiny/eval_policy --gold_reward rlhf.tiny.task:gold_reward

For each policy: mean reward-model score (with --reward_model) with a 95% CI, win-rate against the reference judged
by the reward model, KL(policy || reference) on the policy's own samples (both at the sampling temperature),
response length and EOS rate, a flag when the reward model's preference comes with a far drift in length or KL
(possible reward hacking), plots (scores, reward vs KL, per-prompt score distributions) and samples side by side.
Real data has no gold reward; a task that has one names it with --gold_reward, and the gold reward and win-rate by
it join the table. Importing it runs its code, so the one a policy's manifest names is only reported, and run only
with --trust_manifest_gold_reward true. The gold-reward check also runs at the end of every policy stage, so each
manifest records how good its policy really is.
"""

from __future__ import annotations

import importlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf.config import ConfigError, ModelArgs, parse_args
from rlhf.data import prompt_text
from rlhf.evaluate.names import display_names
from rlhf.evaluate.rm_report import wilson_interval
from rlhf.generation import encode_prompts, generate, response_logprobs


def load_gold_reward(spec: str) -> Callable[[str, str], float]:
    """Import a gold reward given as 'package.module:function'. Importing runs the module's code: call this only with
    a spec the user named (command line or recipe), never one read from a stage folder (see pick_gold_reward)."""
    if not isinstance(spec, str):
        raise ConfigError(f"gold_reward {spec!r}: expected a string 'package.module:function'")
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"gold_reward {spec!r}: expected 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"gold_reward {spec!r}: cannot import it ({error})") from None
    if not callable(function):
        raise ConfigError(f"gold_reward {spec!r}: {function_name} is not a function (expected f(prompt, response))")
    return function


def pick_gold_reward(cli_spec: str | None, manifest_spec: str | None, trust_manifest: bool = False,
                     manifest_path: str = "the policy's manifest") -> tuple[str | None, str | None]:
    """Which gold reward eval-policy may import: (spec to load or None, a notice to print or None).

    Importing a module runs its code, and a stage folder may come from someone else, so a gold reward named only by a
    manifest runs only when the user confirms it (trust_manifest). One named on the command line or in the recipe
    (cli_spec) always wins."""
    if cli_spec:
        return cli_spec, None
    if not manifest_spec:
        return None, None
    if trust_manifest:
        return manifest_spec, None
    # Shown as written only when it looks like module:function; anything else (control characters...) as a repr.
    plain = isinstance(manifest_spec, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", manifest_spec)
    shown = manifest_spec if plain else repr(manifest_spec)
    return None, (f"{manifest_path} names gold_reward {shown}; it was not imported or run (code named by a stage "
                  f"folder runs only when you ask). To use it, pass --gold_reward {shown} or "
                  f"--trust_manifest_gold_reward true")


def mean_with_interval(values: list[float]) -> dict:
    """Mean and a normal-approximation 95% confidence interval."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((value - mean) ** 2 for value in values) / max(n - 1, 1)
    half_width = 1.96 * math.sqrt(variance / n)
    return {"mean": mean, "ci95": [mean - half_width, mean + half_width], "n": n}


def win_rate(scores: list[float], other_scores: list[float]) -> dict:
    """How often a score beats its paired other score (a tie counts half), with a Wilson 95% CI: unlike the normal
    approximation it stays inside [0, 1] and is not [1, 1] for 3 wins of 3, so a few prompts never make a policy
    "clearly preferred" (the reward-hacking rule reads its lower bound)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores)]
    return {"mean": sum(wins) / len(wins), "ci95": wilson_interval(sum(wins), len(wins)), "n": len(wins)}


def sample_responses(model, tokenizer, prompts: list[list[dict]], batch_size: int = 32, max_new_tokens: int = 64,
                     temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True, seed: int = 0,
                     reference_model=None, engine: str = "dynamic", sampling_dtype: str | None = None) -> dict:
    """Responses (text), EOS flags and token lengths for each prompt, with a fixed sampling seed. With a reference
    model, also the per-sequence KL estimate sum_t [log pi(y_t) - log pi_ref(y_t)] on these samples, both models
    scored at the sampling temperature: the KL between the distributions actually sampled, as PPO measures it (at
    temperature 1 the policy's log-probs are not those of the distribution the samples came from, and the estimate
    is biased, even negative)."""
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer.padding_side = "left"
    texts, ended, lengths, kl = [], [], [], []
    encoded = encode_prompts(tokenizer, prompts)
    for start in range(0, len(encoded), batch_size):
        batch = generate(model, tokenizer, encoded[start:start + batch_size], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, do_sample=do_sample, engine=engine,
                         sampling_dtype=getattr(torch, sampling_dtype) if sampling_dtype else None)
        texts += batch.texts
        ended += batch.ended.tolist()
        lengths += batch.response_mask.sum(dim=1).tolist()
        if reference_model is not None:
            with torch.no_grad():
                sequence = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
                scoring_temperature = temperature if do_sample else 1.0  # greedy decoding ignores the temperature
                policy_logprobs = response_logprobs(model, *sequence, temperature=scoring_temperature)
                reference_logprobs = response_logprobs(reference_model, *sequence, temperature=scoring_temperature)
            kl += (policy_logprobs - reference_logprobs).sum(dim=1).tolist()
    return {"texts": texts, "ended": ended, "lengths": lengths, "kl": kl}


def gold_report(model, tokenizer, prompts: list[list[dict]], gold_reward: Callable[[str, str], float], **sampling) -> dict:
    """Mean gold reward (with CI), EOS rate and response length of the policy's samples."""
    samples = sample_responses(model, tokenizer, prompts, **sampling)
    rewards = [gold_reward(prompt_text(prompt), text) for prompt, text in zip(prompts, samples["texts"])]
    report = summarise(samples, {"gold": rewards})
    report["examples"] = [{"prompt": prompt_text(prompt), "response": text, "gold_reward": reward}
                          for prompt, text, reward in list(zip(prompts, samples["texts"], rewards))[:5]]
    return report


@dataclass
class EvalPolicyArgs:
    policy: list[str] = field(default_factory=list, metadata={"help": "Policy stage folder(s) to evaluate."})
    prompts: str | None = field(default=None, metadata={"help": "Held-out prompts: file, folder or dataset name."})
    split: str = field(default="test", metadata={"help": "Split to read when prompts is a dataset or folder."})
    reference: str | None = field(default=None, metadata={"help": "Reference stage folder (default: the first "
                                                           "policy's parent, e.g. the SFT stage)."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward stage folder scoring the samples (RM score, "
                                                              "win-rate vs the reference, reward-hacking flag)."})
    gold_reward: str | None = field(default=None, metadata={"help": "module:function gold reward to import and score "
                                                             "samples with, e.g. rlhf.tiny.task:gold_reward."})
    trust_manifest_gold_reward: bool = field(default=False, metadata={
        "help": "Without --gold_reward, import and run the gold reward the first policy's manifest names. Importing "
                "runs that module's code, so a stage folder from someone else could run any installed module: only "
                "set this for stage folders you trust. Off: the manifest's gold reward is reported, not run."})
    out: str | None = field(default=None, metadata={"help": "Report folder (default: <first policy>/eval_policy)."})
    max_samples: int = field(default=128, metadata={"help": "Prompts to sample."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response sampled."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (the KL is measured at it "
                                                       "too: between the distributions sampled from)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch."})
    generation_engine: str = field(default="dynamic", metadata={
        "help": "dynamic (transformers' generate), static (preallocated KV cache, compiled on GPUs) or paged "
                "(continuous batching); see benchmarks/generation_engines.py.", "choices": ["dynamic", "static", "paged"]})
    sampling_dtype: str | None = field(default=None, metadata={
        "help": "Sample under autocast in this dtype (bfloat16), the weights unchanged; the KL is still scored in "
                "the models' own precision.", "choices": ["bfloat16", "float16"]})
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for every model)."})
    n_examples: int = field(default=8, metadata={"help": "Samples shown side by side in report.md."})
    hacking_max_kl: float = field(default=10.0, metadata={
        "help": "Flag possible reward hacking when the reward model prefers a policy (lower 95% bound of its win-rate "
                "above 0.5) while its KL to the reference exceeds this many nats per sequence..."})
    hacking_length_factor: float = field(default=1.5, metadata={
        "help": "...or while its mean response length is more than this factor longer or shorter than the reference's."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modelling code shipped with the model."})
    device: str = field(default="auto", metadata={"help": "Where the models run: auto (the GPU when there is one, "
                                                  "else the CPU), cpu, cuda or cuda:<index>."})


ARG_TYPES = (EvalPolicyArgs,)


def compare_policies(policies: dict[str, object], tokenizer, prompts: list[list[dict]], reference=None,
                     reward_model=None, reward_tokenizer=None, gold: Callable[[str, str], float] | None = None,
                     n_examples: int = 8, **sampling) -> dict:
    """Sample every policy (and the reference) on the same prompts with the same seed; score and compare."""
    from rlhf.evaluate.scoring import score_conversations

    def score(texts):
        results = {}
        if gold is not None:
            results["gold"] = [gold(prompt_text(prompt), text) for prompt, text in zip(prompts, texts)]
        if reward_model is not None:
            conversations = [prompt + [{"role": "assistant", "content": text}] for prompt, text in zip(prompts, texts)]
            results["rm"] = score_conversations(reward_model, reward_tokenizer, conversations, show_progress=False)[0]
        return results

    reference_samples = sample_responses(reference, tokenizer, prompts, **sampling) if reference is not None else None
    reference_scores = score(reference_samples["texts"]) if reference_samples else {}
    report: dict = {"n_prompts": len(prompts), "sampling": sampling, "policies": {}}
    if reference_samples:
        report["reference"] = summarise(reference_samples, reference_scores)
        report["reference"]["per_prompt"] = per_prompt(reference_samples, reference_scores)
    for name, policy in policies.items():
        samples = sample_responses(policy, tokenizer, prompts, reference_model=reference, **sampling)
        scores = score(samples["texts"])
        summary = summarise(samples, scores)
        summary["per_prompt"] = per_prompt(samples, scores)
        if reference_samples:
            for key in scores:
                summary[f"win_rate_vs_reference_{key}"] = win_rate(scores[key], reference_scores[key])
        summary["examples"] = [
            {"prompt": prompt_text(prompts[i]), "policy": samples["texts"][i],
             "reference": reference_samples["texts"][i] if reference_samples else None,
             **{f"policy_{key}": values[i] for key, values in scores.items()},
             **{f"reference_{key}": values[i] for key, values in reference_scores.items()}}
            for i in range(min(n_examples, len(prompts)))
        ]
        report["policies"][name] = summary
    return report


def per_prompt(samples: dict, scores: dict) -> dict[str, list[float]]:
    """Every prompt's values, in prompt order (the score distributions are plotted from these)."""
    return {**scores, "length": samples["lengths"], **({"kl": samples["kl"]} if samples.get("kl") else {})}


def summarise(samples: dict, scores: dict) -> dict:
    n = len(samples["texts"])
    summary = {
        "response_length": sum(samples["lengths"]) / n,
        "eos_rate": sum(samples["ended"]) / n,
    }
    if samples.get("kl"):
        summary["kl_to_reference"] = mean_with_interval(samples["kl"])
    if "gold" in scores:
        summary["gold_reward"] = mean_with_interval(scores["gold"])
    if "rm" in scores:
        summary["reward_model_score"] = mean_with_interval(scores["rm"])
    return summary


MISSING = "–"  # a value that cannot exist for a row, e.g. the reference's win-rate against itself


def format_interval(value: dict | None) -> str:
    """A mean_with_interval result as "mean [low, high]"."""
    if not value:
        return MISSING
    return f"{value['mean']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"


def reward_hacking(summary: dict, reference: dict, reference_name: str = "the reference", max_kl: float = 10.0,
                   length_factor: float = 1.5) -> str | None:
    """Why a policy may be hacking the reward model, or None: the reward model clearly prefers it to the reference
    (the lower 95% bound of its win-rate is above 0.5) while its mean length moved by more than length_factor either
    way or its KL to the reference is above max_kl nats per sequence. Without a gold reward this is the warning that
    the reward model's preference may not be real."""
    win_rate_rm = summary.get("win_rate_vs_reference_rm")
    if not win_rate_rm or win_rate_rm["ci95"][0] <= 0.5:
        return None
    drifts = []
    if reference.get("response_length"):
        ratio = summary["response_length"] / reference["response_length"]
        if ratio > length_factor or ratio < 1 / length_factor:
            drifts.append(f"length {ratio:.1f}x {reference_name}")
    kl = summary.get("kl_to_reference")
    if kl and kl["mean"] > max_kl:
        drifts.append(f"KL {kl['mean']:.1f} nats (above {max_kl:g})")
    return f"win-rate {win_rate_rm['mean']:.2f} while {' and '.join(drifts)}" if drifts else None


def policy_table(report: dict, reference_name: str = "reference",
                 extra: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Markdown lines: the reference's row, then each policy's, and a line per reward-hacking flag. A value that cannot
    exist for a row is "–"; a column with no value in any row is left out (reward-model columns without a reward model,
    gold ones without a gold reward). `extra`: more columns, {label: {policy path: cell}} (the pipeline's time and
    memory; the reference's cell is "–")."""
    versus = f"vs {reference_name}"
    columns = {  # label -> cell of a summary (is_reference tells the reference's row)
        "RM score": lambda summary, is_reference: format_interval(summary.get("reward_model_score")),
        f"win-rate {versus} (RM)": lambda summary, is_reference: format_interval(
            summary.get("win_rate_vs_reference_rm")),
        f"KL to {reference_name}": lambda summary, is_reference: "0" if is_reference else format_interval(
            summary.get("kl_to_reference")),
        "length": lambda summary, is_reference: f"{summary['response_length']:.1f}",
        "EOS rate": lambda summary, is_reference: f"{summary['eos_rate']:.2f}",
        "gold reward": lambda summary, is_reference: format_interval(summary.get("gold_reward")),
        f"win-rate {versus} (gold)": lambda summary, is_reference: format_interval(
            summary.get("win_rate_vs_reference_gold")),
    }
    names = display_names(list(report["policies"]))
    rows = ([(reference_name, report["reference"], True)] if "reference" in report else []) + [
        (path, summary, False) for path, summary in report["policies"].items()]
    table = {"policy": [reference_name if is_reference else names[path] for path, _, is_reference in rows]}
    for label, cell in columns.items():
        table[label] = [cell(summary, is_reference) for _, summary, is_reference in rows]
    for label, cells in (extra or {}).items():
        table[label] = [MISSING if is_reference else cells.get(path, MISSING) for path, _, is_reference in rows]
    table = {label: cells for label, cells in table.items() if any(cell != MISSING for cell in cells)}
    lines = ["| " + " | ".join(table) + " |", "|" + "---|" * len(table)]
    lines += ["| " + " | ".join(cells) + " |" for cells in zip(*table.values())]
    flags = report.get("reward_hacking", {})
    if flags:
        lines.append("")
        lines += [f"possible reward hacking: {names.get(path, path)} — {reason}" for path, reason in flags.items()]
    return lines


def report_markdown(report: dict, reference_name: str | None, plots: list[str] = ()) -> str:
    from rlhf.evaluate.plots import CAPTIONS

    names = display_names(list(report["policies"]))
    lines = ["# Policy evaluation", "", f"{report['n_prompts']} held-out prompts, sampling {report['sampling']}.",
             f"Reference: {report.get('reference_path') or 'none'}. Reward model: "
             f"{report.get('reward_model_path') or 'none'}. Values are means with 95% confidence intervals.", "",
             *([f"Gold reward not run: {report['gold_reward_not_run']}", ""] if report.get("gold_reward_not_run") else []),
             *policy_table(report, reference_name or "reference"),
             *[line for name in plots for line in ("", f"![{CAPTIONS[name]}]({name})")]]
    for path, name in names.items():
        lines += ["", f"## Samples: {name}", "", "| prompt | reference | policy |", "|---|---|---|"]
        for example in report["policies"][path]["examples"]:
            def cell(text, side=None):
                scores = [f"{label} {example[f'{side}_{key}']:.2f}" for key, label in (("rm", "RM"), ("gold", "gold"))
                          if isinstance(example.get(f"{side}_{key}"), float)]
                suffix = f" ({', '.join(scores)})" if scores else ""
                return (str(text or "")[:200] + suffix).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {cell(example['prompt'])} | {cell(example['reference'], 'reference')} | "
                         f"{cell(example['policy'], 'policy')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args(ARG_TYPES, argv, prog="rlhf eval-policy", description=__doc__)
    if not args.policy:
        raise ConfigError("eval-policy: give at least one --policy stage folder")
    if not args.prompts:
        raise ConfigError("eval-policy: --prompts is required (a prompt file, folder or dataset name)")

    from rlhf.data import check_chat_markup, load_prompts
    from rlhf.evaluate.devices import pick_device
    from rlhf.evaluate.rm import load_reward_model
    from rlhf.manifest import atomic_write, read_manifest
    from rlhf.models import load_stage_output, stage_tokenizer

    device = pick_device(args.device)  # a device this machine lacks fails before anything loads
    records = load_prompts(args.prompts, args.split)[: args.max_samples]
    prompts = [record["prompt"] for record in records]
    model_args = ModelArgs(dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    manifests = {path: read_manifest(path) for path in args.policy}
    first = manifests[args.policy[0]]
    reference_path = args.reference or first.parent
    gold_spec, gold_notice = pick_gold_reward(args.gold_reward, first.config.get("data", {}).get("gold_reward"),
                                              args.trust_manifest_gold_reward,
                                              str(Path(args.policy[0]) / "manifest.json"))
    gold = load_gold_reward(gold_spec) if gold_spec else None  # fail on a bad spec before loading any model
    tokenizer = stage_tokenizer(first, model_args)
    check_chat_markup(records, tokenizer, args.prompts, "prompt")  # text already templated would be templated again

    policies = {path: load_stage_output(manifest, model_args).to(device).eval() for path, manifest in manifests.items()}
    reference = (load_stage_output(read_manifest(reference_path), model_args).to(device).eval() if reference_path
                 else None)
    reward_model, reward_tokenizer = load_reward_model(args.reward_model, model_args) if args.reward_model else (None, None)
    reward_model = reward_model.to(device) if reward_model is not None else None
    report = compare_policies(
        policies, tokenizer, prompts, reference=reference, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
        gold=gold, n_examples=args.n_examples,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, engine=args.generation_engine, sampling_dtype=args.sampling_dtype,
    )
    report["reference_path"] = reference_path
    report["device"] = str(device)
    report["reward_model_path"] = args.reward_model
    report["gold_reward_spec"] = gold_spec
    if gold_notice:
        report["gold_reward_not_run"] = gold_notice
    reference_name = Path(reference_path).name if reference_path else "reference"
    if "reference" in report:
        flags = {path: reward_hacking(summary, report["reference"], reference_name, args.hacking_max_kl,
                                      args.hacking_length_factor) for path, summary in report["policies"].items()}
        report["reward_hacking"] = {path: reason for path, reason in flags.items() if reason}
    out_dir = Path(args.out or Path(args.policy[0]) / "eval_policy")
    from rlhf.evaluate.plots import write_policy_plots

    plots = write_policy_plots(report, out_dir, reference_name)
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write(out_dir / "report.md", report_markdown(report, reference_name, plots))
    names = display_names(list(report["policies"]))
    for path, summary in report["policies"].items():
        values = [("RM score", summary.get("reward_model_score")),
                  (f"win-rate vs {reference_name} (RM)", summary.get("win_rate_vs_reference_rm")),
                  ("gold", summary.get("gold_reward")), ("KL", summary.get("kl_to_reference"))]
        shown = "".join(f"{label} {format_interval(value)}, " for label, value in values if value)
        print(f"[rlhf] {names[path]}: {shown}length {summary['response_length']:.1f}, "
              f"EOS rate {summary['eos_rate']:.2f}")
    for path, reason in report.get("reward_hacking", {}).items():
        print(f"[rlhf] possible reward hacking: {names[path]} — {reason}")
    if gold_notice:
        print(f"[rlhf] {gold_notice}")
    print(f"[rlhf] report -> {out_dir / 'report.md'}")
    return report
