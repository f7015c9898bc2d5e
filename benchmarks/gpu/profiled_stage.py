"""Runs one TRL stage command (`rlhf.sft`, `rlhf.reward`, `rlhf.dpo`, `rlhf.grpo`) unchanged and writes, at exit, what
TRL measures but does not keep: every Trainer.log call with its time, and TRL's profiling spans (generation, reward
scoring, ...), which TRL sends only to wandb, MLflow or trackio.

    python benchmarks/gpu/profiled_stage.py OUT.json rlhf.grpo --config recipes/tiny/grpo.yaml --logging_steps 1 ...

With logging_steps 1 the log times give each step's duration, so the first step's warm-up (kernel selection,
allocator growth) can be left out of tokens/s: the stage's train_seconds includes it.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    out, module, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    logs, spans = [], []

    import transformers
    from trl.extras.profiling import ProfilingContext

    trainer_log, span_end = transformers.Trainer.log, ProfilingContext._log_metrics

    def log(self, values, *args, **kwargs):
        logs.append({"time": time.perf_counter(), "global_step": self.state.global_step, **values})
        return trainer_log(self, values, *args, **kwargs)

    def span(self, duration):
        spans.append({"name": self.name, "step": self.step, "seconds": duration})
        return span_end(self, duration)

    transformers.Trainer.log, ProfilingContext._log_metrics = log, span
    atexit.register(lambda: out.write_text(json.dumps({"logs": logs, "spans": spans}, default=str)))
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
