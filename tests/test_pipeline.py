"""The pipeline command: hand-off by manifest, skip when up to date, --force, rerun after a config change."""

import json

import pytest

from rlhf.config import ConfigError
from rlhf.manifest import read_manifest
from rlhf.pipeline import main

QUICK_SFT = ["--max_steps", "3", "--save_steps", "2", "--max_train_samples", "48", "--gold_eval_prompts", "",
             "--eval_data", ""]


def write_recipe(tmp_path, **changes):
    recipe = {
        "name": "test", "output_dir": str(tmp_path / "runs"), "stages": ["sft"],
        "sft_recipe": "recipes/tiny/sft.yaml", "sft_args": QUICK_SFT,
        "accelerate_config": "recipes/accelerate/cpu.yaml",
    }
    recipe.update(changes)
    path = tmp_path / "pipeline.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_skip_force_and_config_change(tmp_path):
    recipe = write_recipe(tmp_path)
    report = main(["--config", recipe])
    assert report.is_file()
    first = read_manifest(tmp_path / "runs" / "sft")
    assert first.metrics["steps"] == 3

    main(["--config", recipe])  # unchanged: skipped
    assert read_manifest(tmp_path / "runs" / "sft").created == first.created
    assert json.loads((tmp_path / "runs" / "pipeline.json").read_text())["sft"]["skipped"] is True

    main(["--config", recipe, "--force"])  # forced: rerun
    forced = read_manifest(tmp_path / "runs" / "sft")
    assert forced.config_hash == first.config_hash
    assert forced.created != first.created

    changed = write_recipe(tmp_path, sft_args=QUICK_SFT + ["--learning_rate", "1e-3"])
    main(["--config", changed])  # changed config: a new run with a new hash
    assert read_manifest(tmp_path / "runs" / "sft").config_hash != first.config_hash


@pytest.mark.parametrize("changes, message", [
    ({"stages": ["sft", "rlhf"]}, "unknown stage"),
    ({"sft_recipe": "recipes/tiny/missing.yaml"}, "file not found"),
    ({"accelerate_config": "nope.yaml"}, "accelerate config nope.yaml"),
])
def test_bad_pipeline_recipes_fail_fast(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        main(["--config", write_recipe(tmp_path, **changes)])
