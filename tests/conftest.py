"""Shared fixtures: the repo's paths, and one tiny SFT run reused by every test that needs a trained policy."""

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_BASE = str(REPO / "data" / "tiny-base")
TINY_DATA = REPO / "data" / "tiny"


@pytest.fixture(autouse=True, scope="session")
def _offline_and_in_repo():
    # Recipes name repo-relative paths (data/tiny-base); nothing may reach a model hub, nor wandb's servers.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["WANDB_MODE"] = "offline"
    previous = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """The tiny SFT recipe, trained once per test session; returns its manifest."""
    from rlhf import sft

    output_dir = tmp_path_factory.mktemp("runs") / "sft"
    os.chdir(REPO)
    return sft.main(["--config", "recipes/tiny/sft.yaml", "--output_dir", str(output_dir)])


@pytest.fixture(scope="session")
def reward_run(sft_run, tmp_path_factory):
    """The tiny reward-model recipe started from the session's SFT run; returns its manifest."""
    from rlhf import reward

    output_dir = tmp_path_factory.mktemp("runs") / "reward"
    os.chdir(REPO)
    return reward.main(["--config", "recipes/tiny/reward.yaml", "--init_from", sft_run.output_dir,
                        "--output_dir", str(output_dir)])


@pytest.fixture(scope="session")
def dpo_run(sft_run, tmp_path_factory):
    """The tiny DPO recipe started from the session's SFT run; returns its manifest."""
    from rlhf import dpo

    output_dir = tmp_path_factory.mktemp("runs") / "dpo"
    os.chdir(REPO)
    return dpo.main(["--config", "recipes/tiny/dpo.yaml", "--init_from", sft_run.output_dir,
                     "--output_dir", str(output_dir)])


@pytest.fixture(scope="session")
def ppo_run(sft_run, reward_run, tmp_path_factory):
    """The tiny PPO recipe on the session's SFT and reward runs; returns its manifest."""
    from rlhf.ppo import trainer

    output_dir = tmp_path_factory.mktemp("runs") / "ppo"
    os.chdir(REPO)
    return trainer.main(["--config", "recipes/tiny/ppo.yaml", "--init_from", sft_run.output_dir,
                         "--reward_model", reward_run.output_dir, "--output_dir", str(output_dir)])


@pytest.fixture(scope="session")
def grpo_run(sft_run, reward_run, tmp_path_factory):
    """The tiny GRPO recipe (rewarded by the session's reward model) on the session's SFT run; returns its manifest."""
    from rlhf import grpo

    output_dir = tmp_path_factory.mktemp("runs") / "grpo"
    os.chdir(REPO)
    return grpo.main(["--config", "recipes/tiny/grpo.yaml", "--init_from", sft_run.output_dir,
                      "--reward_model", reward_run.output_dir, "--output_dir", str(output_dir)])


@pytest.fixture(scope="session")
def lora_reward_run(sft_run, tmp_path_factory):
    """A short LoRA reward model (adapter + score head) on the session's SFT run: the shape real models use."""
    from rlhf import reward

    output_dir = tmp_path_factory.mktemp("runs") / "reward_lora"
    os.chdir(REPO)
    return reward.main(["--config", "recipes/tiny/reward.yaml", "--init_from", sft_run.output_dir,
                        "--output_dir", str(output_dir), "--use_lora", "true", "--lora_r", "16", "--lora_alpha", "32",
                        "--learning_rate", "2e-3", "--max_steps", "20", "--stats_samples", "64",
                        "--eval_data", "", "--save_merged", "false"])


def short_ppo_run(sft_run, reward_run, output_dir, *extra):
    """A few small PPO steps from the session's SFT and reward stages (8 rollouts, 24 new tokens, no gold report)."""
    from rlhf.ppo import trainer

    return trainer.main(["--config", "recipes/tiny/ppo.yaml", "--init_from", sft_run.output_dir,
                         "--reward_model", reward_run.output_dir, "--output_dir", str(output_dir),
                         "--rollout_batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs", "1",
                         "--max_new_tokens", "24", "--gold_eval_prompts", "", "--save_merged", "false", *extra])


def metrics_rows(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every TensorBoard event file under folder, {tag: [(step, value), ...]}. Event files are
    TFRecords (length, its CRC, the event, its CRC); tensorboardX brings the Event protobuf."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def kill_when(command: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start `command` (from the repo), SIGKILL its whole process group as soon as `ready()` holds."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert ready(), f"{' '.join(command)} ended or timed out before it was to be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def held_out_curve(run, sft_gold: float) -> list[dict]:
    """A policy stage's held-out curve (the tiny recipes ask for 5 points), checked to start from the SFT policy (its
    gold reward, same prompts and seed) and to end, better, at the last training step; returns its rows."""
    from rlhf.evaluate.curve import CURVE_NAME, read_curve

    curve = read_curve(Path(run.output_dir) / CURVE_NAME)
    assert curve[0]["step"] == 0 and curve[-1]["step"] == run.metrics["steps"] and len(curve) == 6
    assert curve[0]["gold_reward"] == pytest.approx(sft_gold, abs=0.02)
    assert curve[-1]["gold_reward"] > curve[0]["gold_reward"] + 0.05
    assert len(curve[-1]["samples"]) == 64 and 0 < curve[1]["seconds"] < curve[-1]["seconds"]
    return curve
