"""What every stage does with its output folder: a finished run is never overwritten by accident, a rerun of the same
configuration changes nothing, one lock per folder, and a launch whose processes cannot see each other is refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from rlhf.cli import main
from rlhf.manifest import read_manifest
from rlhf.config import ConfigError
from rlhf.stage import LOCK_NAME, check_writable, hold_output_lock, trackers

SFT = ["sft", "--config", "recipes/tiny/sft.yaml"]


def copy_stage(manifest, destination):
    shutil.copytree(manifest.output_dir, destination, ignore=shutil.ignore_patterns(LOCK_NAME))
    return destination


def test_rerunning_a_finished_stage_changes_nothing(sft_run, tmp_path, capsys):
    folder = copy_stage(sft_run, tmp_path / "sft")
    before = (folder / "manifest.json").read_bytes()
    assert main(SFT + ["--output_dir", str(folder)]) == 0
    assert "already holds this run" in capsys.readouterr().out
    assert (folder / "manifest.json").read_bytes() == before
    assert json.loads(before)["metrics"]["train_loss"] > 0


def test_another_configuration_is_refused_unless_overwrite(sft_run, tmp_path, capsys):
    folder = copy_stage(sft_run, tmp_path / "sft")
    before = (folder / "manifest.json").read_bytes()
    assert main(SFT + ["--output_dir", str(folder), "--max_steps", "3"]) == 1
    error = capsys.readouterr().err
    assert "holds a finished 'sft' run of another configuration" in error and "--overwrite true" in error
    assert (folder / "manifest.json").read_bytes() == before

    assert main(SFT + ["--output_dir", str(folder), "--max_steps", "3", "--overwrite", "true",
                       "--gold_eval_prompts", "", "--save_merged", "false"]) == 0
    replaced = read_manifest(folder)
    assert replaced.metrics["steps"] == 3 and replaced.merged_path is None
    assert not (folder / "merged").exists()  # nothing of the old run is left to be mistaken for this one


def test_finished_ppo_rerun_keeps_its_metrics(ppo_run, sft_run, reward_run, tmp_path):
    from rlhf.ppo import trainer

    folder = copy_stage(ppo_run, tmp_path / "ppo")
    before = (folder / "manifest.json").read_bytes()
    rerun = trainer.main(["--config", "recipes/tiny/ppo.yaml", "--init_from", sft_run.output_dir,
                          "--reward_model", reward_run.output_dir, "--output_dir", str(folder)])
    assert (folder / "manifest.json").read_bytes() == before
    assert rerun.metrics["first"]["step"] == 1 and rerun.metrics["last"]["step"] == ppo_run.metrics["steps"]


def test_one_lock_file_per_folder(tmp_path):
    from rlhf.stage import StageError

    held = hold_output_lock(str(tmp_path / "out"))  # noqa: F841
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [LOCK_NAME]
    with pytest.raises(StageError, match="in use by another run"):
        hold_output_lock(str(tmp_path / "out"))


def test_unwritable_output_is_found_before_training(tmp_path):
    (tmp_path / "out").mkdir()
    assert check_writable(tmp_path / "out") is None
    (tmp_path / "out" / "checkpoints").symlink_to("/proc/self")
    assert "checkpoints is not writable" in check_writable(tmp_path / "out")


@pytest.mark.parametrize("module", ["rlhf.sft", "rlhf.ppo"])  # a TRL stage and our own
def test_launch_whose_processes_cannot_see_each_other_is_refused(module, tmp_path):
    """Two processes without ACCELERATE_USE_CPU on a CPU machine: accelerate would run each alone."""
    stage = module.split(".")[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
               "--main_process_port", "29617", "-m", module, "--config", f"recipes/tiny/{stage}.yaml",
               "--output_dir", str(tmp_path / stage)]
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "this launch started 2 processes" in result.stderr and "ACCELERATE_USE_CPU=1" in result.stderr
    assert result.stderr.count("this launch started 2 processes") == 1  # said once, by rank 0
    assert not (tmp_path / stage).exists()  # nothing written, nothing trained


def _continue_finished_run(rank: int, output_dir: str, port: int, results: str) -> None:
    """One of two gloo processes opening a finished folder that this run extends (as PPO does with more steps).
    Rank 1 looks late, after rank 0 has already retired the manifest."""
    import time

    import torch.distributed as dist

    from rlhf import stage

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # as a launcher sets them
    barriers = []
    real_barrier = stage._barrier
    stage._barrier = lambda: (barriers.append(1), real_barrier())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=20))
    if rank == 1:
        time.sleep(2)
    _, finished = stage.open_output("sft", output_dir, {"training": {}}, overwrite=False, extends=lambda done: True)
    dist.barrier()
    (Path(results) / f"rank{rank}").write_text(f"{finished} {len(barriers)}")
    dist.destroy_process_group()


def test_every_rank_follows_rank_0s_verdict_on_the_output_folder(sft_run, tmp_path):
    """Each rank used to read the folder itself: one that looked after rank 0 had removed the manifest of the run
    being continued took the 'new folder' path, skipped the barrier, and the run hung (seen with PPO resumes)."""
    import torch.multiprocessing

    folder = copy_stage(sft_run, tmp_path / "sft")
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(_continue_finished_run, args=(str(folder), 29641, str(results)), nprocs=2)
    # Both continued the run (not "nothing to do") through the same collectives.
    assert [(results / f"rank{rank}").read_text() for rank in (0, 1)] == ["None 1", "None 1"]
    assert not (folder / "manifest.json").exists()  # retired until the continued run writes its own


def test_trackers_are_checked_before_anything_loads():
    assert trackers("none") == [] and trackers(["none"]) == [] and trackers(["tensorboard"]) == ["tensorboard"]
    assert "tensorboard" in trackers("all")
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        trackers(["tensorbord"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="wandb is not installed; pip install wandb"):
            trackers("wandb")


def test_keys_added_later_leave_older_hashes_alone_at_their_default():
    """A run made before model_revision / gold_eval_split existed still matches at their defaults; any other value is
    another configuration."""
    from dataclasses import dataclass

    from rlhf.config import DataArgs, ModelArgs
    from rlhf.manifest import config_hash
    from rlhf.stage import KEYS_ADDED_LATER, stage_config

    @dataclass
    class Training:
        seed: int = 42

    def hashed(model_args=None, data_args=None):
        config = stage_config(model_args or ModelArgs(), data_args or DataArgs(), Training())
        return config, config_hash(config)

    default_config, default_hash = hashed()
    for section, key in KEYS_ADDED_LATER:
        assert key not in default_config[section]  # as in a configuration written before the key existed
    assert hashed(data_args=DataArgs(gold_eval_split="validation"))[1] != default_hash
    assert hashed(model_args=ModelArgs(model_revision="v2"))[1] != default_hash


def test_an_inf_gradient_norm_stops_a_run_except_where_fp16_loss_scaling_skips_that_step(tmp_path):
    from types import SimpleNamespace

    from rlhf.processes import StageError
    from rlhf.stage import NonFiniteLossGuard

    state = SimpleNamespace(global_step=7)
    fp32, fp16 = (SimpleNamespace(fp16=fp16, output_dir=str(tmp_path)) for fp16 in (False, True))
    with pytest.raises(StageError, match="gradient norm became inf at step 7"):
        NonFiniteLossGuard().on_log(fp32, state, None, logs={"loss": 2.3, "grad_norm": float("inf")})
    NonFiniteLossGuard().on_log(fp16, state, None, logs={"loss": 2.3, "grad_norm": float("inf")})  # scaler skips it
    with pytest.raises(StageError, match="loss became nan at step 7"):
        NonFiniteLossGuard().on_log(fp16, state, None, logs={"loss": float("nan"), "grad_norm": 1.0})


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_model_sharded_by_the_accelerate_config_gets_no_curve_sampled_by_one_process(monkeypatch, variable):
    # accelerate launch --config_file fsdp.yaml leaves args.fsdp empty: one process sampling alone would hang the rest.
    from types import SimpleNamespace

    from rlhf.config import DataArgs
    from rlhf.stage import GoldCurveCallback, model_is_sharded

    args = SimpleNamespace(fsdp="", deepspeed=None, seed=0)
    assert not model_is_sharded(args)
    monkeypatch.setenv(variable, "true")
    assert model_is_sharded(args)
    callback = GoldCurveCallback(DataArgs(gold_curve_points=3), "unused", [[{"role": "user", "content": "hi"}]])
    callback.on_train_begin(args, SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0), None)
    assert callback.curve is None


def test_resume_from_checkpoint_as_trl_users_pass_it(tmp_path):
    from types import SimpleNamespace

    from trl import SFTConfig

    from rlhf.checkpoints import COMPLETE_MARKER, prepare_checkpoints
    from rlhf.config import DataArgs, ModelArgs
    from rlhf.manifest import config_hash
    from rlhf.processes import StageError
    from rlhf.stage import stage_config

    def hashed(resume):
        args = SFTConfig(output_dir=str(tmp_path), resume_from_checkpoint=resume, report_to="none", bf16=False)
        return config_hash(stage_config(ModelArgs(), DataArgs(), args))

    assert hashed("true") == hashed(None) == hashed("/elsewhere/checkpoint-4")  # not part of what is trained
    config = {"training": {}}
    with pytest.raises(StageError, match="holds no complete checkpoint"):
        prepare_checkpoints(SimpleNamespace(resume_from_checkpoint="true"), str(tmp_path / "a"), config)
    named = tmp_path / "elsewhere" / "checkpoint-4"
    named.mkdir(parents=True)
    with pytest.raises(StageError, match="not a trainer checkpoint"):
        prepare_checkpoints(SimpleNamespace(resume_from_checkpoint=str(named)), str(tmp_path / "b"), config)
    (named / "trainer_state.json").write_text("{}")
    assert prepare_checkpoints(SimpleNamespace(resume_from_checkpoint=str(named)), str(tmp_path / "c"),
                               config) == str(named)
    done = tmp_path / "d" / "checkpoints" / "checkpoint-2"
    done.mkdir(parents=True)
    (done / COMPLETE_MARKER).write_text("")
    assert prepare_checkpoints(SimpleNamespace(resume_from_checkpoint="true"), str(tmp_path / "d"), config) == str(done)
