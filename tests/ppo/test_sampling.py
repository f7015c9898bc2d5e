"""PPO's rollout sampling options: the generation engine and low-precision sampling keep the update on-policy."""

import math

import pytest

from conftest import metrics_rows, short_ppo_run
from rlhf.config import ConfigError


@pytest.mark.parametrize("flags", [["--sampling_dtype", "bfloat16"], ["--generation_engine", "paged"],
                                   ["--generation_engine", "static", "--critic", "shared"]])
def test_sampling_options_keep_the_first_minibatch_on_policy(sft_run, reward_run, tmp_path, flags):
    """One mini-batch per iteration, so each step's ratio is that of the first mini-batch: the rollout log-probs
    (recomputed in fp32 after bf16 or paged sampling; read during decoding with the static cache) equal the update's."""
    manifest = short_ppo_run(sft_run, reward_run, tmp_path / "run", "--steps", "2", "--mini_batch_size", "8", *flags)
    recomputed = "--generation_engine" not in flags or "paged" in flags
    assert manifest.extra["logprobs_from_generation"] is not recomputed
    rows = metrics_rows(tmp_path / "run")
    assert len(rows) == 2
    for row in rows:
        assert all(math.isfinite(value) for key, value in row.items() if key != "value/explained_variance"), row
        assert row["policy/approx_kl"] < 1e-6, row
        assert 0 < row["response/length"] <= 24
    assert rows[-1]["grad_norm"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--sampling_dtype", "bfloat16"], "cannot be kept with sampling_dtype bfloat16"),
    (["--generation_engine", "paged"], "cannot be kept with the paged engine"),
])
def test_logprobs_from_generation_is_refused_where_sampling_cannot_give_them(sft_run, reward_run, tmp_path, flags,
                                                                              message):
    with pytest.raises(ConfigError, match=message):
        short_ppo_run(sft_run, reward_run, tmp_path / "bad", "--steps", "1", "--logprobs_from_generation", "true",
                      *flags)
    assert not (tmp_path / "bad").exists()
