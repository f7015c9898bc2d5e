"""Evaluate one or more reward models on preference pairs: accuracy (with CI), margins, calibration, subsets, length
bias, worst pairs, plots, and a per-pair scores file.

    rlhf eval-rm --model runs/tiny/reward --data data/tiny/prefs_test.jsonl --out runs/tiny/eval_rm
    rlhf eval-rm --model runs/a/reward runs/b/reward --data data/tiny/prefs_test.jsonl --out runs/compare_rm
    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m rlhf.evaluate.rm --model ... --data ...

A model is a stage folder (with manifest.json) or a sequence-classification model folder. Data may be any
preference layout the data layer reads: explicit or implicit prompt, HH-RLHF raw text, RewardBench (subset column);
or RewardBench 2's best-of-N layout (`chosen` and `rejected` lists of responses), scored as best-of-N accuracy: a
record is correct when every chosen response scores above every rejected one (overall and per subset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import ConfigError, ModelArgs, parse_args
from rlhf.data import BEST_OF_N, PAIRS


@dataclass
class EvalRMArgs:
    model: list[str] = field(default_factory=list, metadata={"help": "Reward model(s): stage folder or model folder."})
    data: str | None = field(default=None, metadata={"help": "Preference pairs: file, folder or hub dataset name."})
    split: str = field(default="test", metadata={"help": "Split to read when data is a hub dataset or folder."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (subset) name."})
    on_bad_record: str = field(
        default="error", metadata={"help": "Malformed records: error (stop at the first) or skip (leave them out, "
                                   "counted and the first reasons printed).", "choices": ["error", "skip"]})
    out: str | None = field(default=None, metadata={"help": "Report folder (default: <model>/eval_rm)."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N pairs."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per forward pass."})
    n_bins: int = field(default=10, metadata={"help": "Calibration bins."})
    n_worst: int = field(default=5, metadata={"help": "Worst-ranked pairs shown in the report."})
    plots: bool = field(default=True, metadata={"help": "Write PNG plots."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run modelling code shipped with the model."})


ARG_TYPES = (EvalRMArgs,)


def load_reward_model(path: str, model_args: ModelArgs):
    """A reward stage folder (by manifest) or a sequence-classification model folder, with its tokenizer."""
    from rlhf.manifest import MANIFEST_NAME, read_manifest
    from rlhf.models import REWARD, load_pretrained, load_stage_output, load_tokenizer, stage_head, stage_tokenizer

    if (Path(path) / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        if stage_head(manifest) != REWARD:
            raise ConfigError(f"{path} is the output of stage '{manifest.stage}', not a reward model")
        return load_stage_output(manifest, model_args), stage_tokenizer(manifest, model_args)
    config_path = Path(path) / "config.json"
    if config_path.is_file():
        architectures = json.loads(config_path.read_text()).get("architectures") or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise ConfigError(f"{path} is a {', '.join(architectures) or 'model'} checkpoint, not a reward model "
                              "(expected a *ForSequenceClassification model or an rlhf reward stage folder)")
    return load_pretrained(path, model_args, REWARD), load_tokenizer(path, model_args.trust_remote_code)


def score_best_of_n(reward_model, tokenizer, records: list[dict], batch_size: int = 32,
                    accelerator=None) -> tuple[list[list[float]], list[list[float]]]:
    """Scores of every chosen and every rejected response of every best-of-N record, in order."""
    from rlhf.evaluate.scoring import score_pairs

    conversations = [record["prompt"] + response for record in records
                     for key in ("chosen", "rejected") for response in record[key]]
    # score_pairs shares the work across processes and keeps the order; it takes conversations two at a time.
    padded = conversations + conversations[-1:] * (len(conversations) % 2)
    twos = [{"prompt": [], "chosen": padded[i], "rejected": padded[i + 1]} for i in range(0, len(padded), 2)]
    scores = score_pairs(reward_model, tokenizer, twos, batch_size, accelerator)
    flat = iter([score for two in zip(scores["chosen"], scores["rejected"]) for score in two])
    chosen, rejected = [], []
    for record in records:
        chosen.append([next(flat) for _ in record["chosen"]])
        rejected.append([next(flat) for _ in record["rejected"]])
    return chosen, rejected


def evaluate_reward_model(path: str, pairs: list[dict], args: EvalRMArgs, accelerator=None,
                          layout: str = PAIRS) -> dict | None:
    """Score every pair (or best-of-N record) and build the report (main process only; None elsewhere)."""
    from rlhf.evaluate.rm_report import best_of_n_rows, build_best_of_n_report, build_report, pair_rows
    from rlhf.evaluate.scoring import score_pairs

    model_args = ModelArgs(dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    reward_model, tokenizer = load_reward_model(path, model_args)
    if accelerator is not None:
        reward_model = reward_model.to(accelerator.device)
    if layout == BEST_OF_N:
        chosen, rejected = score_best_of_n(reward_model, tokenizer, pairs, args.batch_size, accelerator)
        if accelerator is not None and not accelerator.is_main_process:
            return None
        report = build_best_of_n_report(pairs, chosen, rejected, n_worst=args.n_worst)
        report["model"] = path
        report["processes"] = accelerator.num_processes if accelerator is not None else 1
        return {"report": report, "rows": best_of_n_rows(pairs, chosen, rejected)}
    scores = score_pairs(reward_model, tokenizer, pairs, args.batch_size, accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    report = build_report(pairs, scores["chosen"], scores["rejected"], n_bins=args.n_bins, n_worst=args.n_worst,
                          chosen_lengths=scores["chosen_lengths"], rejected_lengths=scores["rejected_lengths"])
    report["model"] = path
    report["processes"] = accelerator.num_processes if accelerator is not None else 1
    return {"report": report, "rows": pair_rows(pairs, scores["chosen"], scores["rejected"])}


def main(argv: list[str] | None = None) -> dict | None:
    (args,) = parse_args(ARG_TYPES, argv, prog="rlhf eval-rm", description=__doc__)
    if not args.model:
        raise ConfigError("eval-rm: give at least one --model (a reward stage folder or model folder)")
    if not args.data:
        raise ConfigError("eval-rm: --data is required (a preference file, folder or dataset name)")

    from accelerate import Accelerator

    from rlhf.data import load_rm_eval
    from rlhf.evaluate.names import display_names
    from rlhf.evaluate.rm_report import write_comparison, write_report

    layout, pairs = load_rm_eval(args.data, args.split, config=args.dataset_config, on_bad_record=args.on_bad_record)
    pairs = pairs[: args.max_samples]
    unit = "best-of-N records" if layout == BEST_OF_N else "pairs"
    accelerator = Accelerator()
    out_dir = Path(args.out or Path(args.model[0]) / "eval_rm")
    results = {}
    # With several models, each gets a sub-folder and a comparison column named after its folder, with as many parent
    # folders as tell two of the same name apart (runs/a/reward and runs/b/reward -> a/reward and b/reward).
    names = display_names(args.model)
    for path in args.model:
        model_out = out_dir if len(args.model) == 1 else out_dir / names[path]
        result = evaluate_reward_model(path, pairs, args, accelerator, layout)
        if result is None:
            continue
        files = write_report(result["report"], model_out, result["rows"], title=f"Reward model evaluation: {path}",
                             plots=args.plots)
        results[path] = result["report"]
        accuracy = result["report"]["accuracy"]
        print(f"[rlhf] {path}: accuracy {accuracy['mean']:.3f} (95% CI {accuracy['ci95'][0]:.3f}-"
              f"{accuracy['ci95'][1]:.3f}) on {len(pairs)} {unit} -> {files['markdown']}")
    if accelerator.is_main_process and len(args.model) > 1:
        comparison = write_comparison({names[path]: report for path, report in results.items()}, out_dir)
        print(f"[rlhf] comparison -> {comparison}")
    accelerator.wait_for_everyone()
    return results if accelerator.is_main_process else None


if __name__ == "__main__":
    main()
