"""How a stage's processes end: a killed pipeline takes the stage it launched down (even after a SIGKILL, which it
cannot forward), and a rank that stops answering ends a multi-process run with a message naming it. Both are kill /
hang tests: slow, bounded by timeouts, and they kill every process they start."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from rlhf.checkpoints import COMPLETE_MARKER
from rlhf.stage import LOCK_NAME

# The stages' error file / pipeline pid must not leak in from an outer `rlhf pipeline` running these tests.
INHERITED = ("RLHF_PIPELINE_PID", "RLHF_ERROR_FILE")


def subprocess_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in INHERITED}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains `text` (here: a test's tmp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if text in cmdline:
            found.append((int(entry.name), cmdline.strip()))
    return found


def kill_everything(process: subprocess.Popen | None, marker: str, extra_pids=()) -> None:
    """SIGKILL what a test started: the process group of `process`, the given pids (SIGCONT first, in case they are
    stopped), and every process whose command line names the test's tmp folder (launchers start their workers in
    sessions of their own, out of reach of the group)."""
    for pid in extra_pids:
        for signum in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
    if process is not None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, _ in processes_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if process is not None:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def wait_for(condition, timeout: float, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def lock_is_free(lock_path: Path) -> bool:
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


@pytest.mark.slow
def test_killed_pipeline_takes_its_stage_down_and_resumes(tmp_path):
    import yaml

    run = tmp_path / "run"
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "killed", "output_dir": str(run), "stages": ["sft"], "sft_recipe": "recipes/tiny/sft.yaml",
        "sft_args": ["--max_steps", "60", "--save_steps", "10", "--gold_eval_prompts", "", "--eval_data", ""],
        "accelerate_config": "recipes/accelerate/cpu.yaml",
    }))
    command = [sys.executable, "-m", "rlhf.cli", "pipeline", "--config", str(recipe)]
    sft = run / "sft"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    pipeline = None
    try:
        with open(first_log, "w") as log:
            pipeline = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_for(lambda: (sft / "checkpoints" / "checkpoint-10" / COMPLETE_MARKER).is_file(), 300, pipeline,
                 "checkpoint-10", first_log)
        assert (sft / LOCK_NAME).is_file()
        assert not lock_is_free(sft / LOCK_NAME)  # the stage holds its folder

        # SIGKILL the pipeline alone (not its group, and the stage runs in a session of its own anyway): it cannot
        # forward this one, so the stage has to notice by itself.
        os.kill(pipeline.pid, signal.SIGKILL)
        killed = time.monotonic()
        pipeline.wait(timeout=30)  # reap it, as any parent (a shell) does

        deadline = killed + 20
        while not lock_is_free(sft / LOCK_NAME) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock_is_free(sft / LOCK_NAME), f"the stage still holds {sft / LOCK_NAME} 20 s after the kill"
        while processes_mentioning(str(run)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_mentioning(str(run))
        assert not left, f"still running 20 s after the pipeline was killed: {left}"
        print(f"\n[test] stage gone {time.monotonic() - killed:.1f} s after the pipeline's SIGKILL")
        assert not (sft / "manifest.json").exists()
        assert "has ended; stopping this stage too" in first_log.read_text()

        # The same command again: the stage resumes from its checkpoints and finishes.
        with open(second_log, "w") as log:
            pipeline = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            code = pipeline.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the rerun did not finish in 600 s:\n{second_log.read_text()[-3000:]}")
        output = second_log.read_text()
        assert code == 0, output[-3000:]
        assert re.search(r"resuming from \S*checkpoint-\d+", output), output[-3000:]
        manifest = json.loads((sft / "manifest.json").read_text())
        assert manifest["metrics"]["steps"] == 60
        timings = json.loads((run / "pipeline.json").read_text())
        assert timings["sft"]["skipped"] is False
        assert (run / "report.md").is_file()
    finally:
        kill_everything(pipeline, str(run))


@pytest.mark.slow
def test_stuck_rank_ends_the_run_naming_it(tmp_path, sft_run, reward_run):
    ddp_timeout = 15
    out = tmp_path / "ppo"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
               "--main_process_port", "29611", "-m", "rlhf.ppo", "--config", "recipes/tiny/ppo.yaml",
               "--init_from", sft_run.output_dir, "--reward_model", reward_run.output_dir, "--output_dir", str(out),
               "--steps", "50", "--rollout_batch_size", "4", "--mini_batch_size", "4", "--ppo_epochs", "1",
               "--max_new_tokens", "16", "--save_steps", "0", "--ddp_timeout", str(ddp_timeout),
               "--gold_eval_prompts", ""]
    stdout_log, stderr_log = tmp_path / "stdout.log", tmp_path / "stderr.log"
    launcher, stopped = None, []
    try:
        with open(stdout_log, "w") as stdout, open(stderr_log, "w") as stderr:
            launcher = subprocess.Popen(command, cwd=REPO, env=subprocess_env(ACCELERATE_USE_CPU="1"), stdout=stdout,
                                        stderr=stderr, start_new_session=True)
        metrics, beat = out / "metrics.jsonl", out / ".heartbeat" / "rank1"

        def training() -> bool:
            return metrics.is_file() and metrics.read_text().count("\n") >= 1 and beat.is_file()

        wait_for(training, 300, launcher, "first PPO step and rank 1 heartbeat", stderr_log)
        pid = int(beat.read_text().split()[0])
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        started = time.monotonic()
        try:
            code = launcher.wait(timeout=ddp_timeout + 90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher was still running {ddp_timeout + 90} s after rank 1 (pid {pid}) was stopped:\n"
                        f"{stderr_log.read_text()[-3000:]}")
        took = time.monotonic() - started
        print(f"\n[test] run ended {took:.1f} s after rank 1 was stopped (ddp_timeout {ddp_timeout} s), exit {code}")
        errors = stderr_log.read_text()
        assert code != 0, errors[-3000:]
        named = [line for line in errors.splitlines() if "rank 0: a collective operation did not complete" in line
                 and f"rank 1 (pid {pid}) is stopped" in line]
        assert named, errors[-3000:]
        print(f"[test] {named[0][:300]}")
        assert not (out / "manifest.json").exists()
    finally:
        kill_everything(launcher, str(out), stopped)


def test_heartbeats_tell_a_stopped_rank_from_a_dead_one(tmp_path):
    from rlhf.processes import ProcessWatch

    stopped = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        time.sleep(0.2)
        watch = ProcessWatch()
        watch.rank, watch.world_size, watch.heartbeat_dir = 0, 4, tmp_path
        host = os.uname().nodename
        (tmp_path / "rank1").write_text(f"{stopped.pid} {host}\n")
        (tmp_path / "rank2").write_text(f"{dead.pid} {host}\n")
        (tmp_path / "rank3").write_text(f"{os.getpid()} {host}\n")  # alive and beating: not named
        silent = watch.silent_ranks()
        assert len(silent) == 2
        assert f"rank 1 (pid {stopped.pid}) is stopped" in silent[0]
        assert f"rank 2 (pid {dead.pid}) has exited" in silent[1]
    finally:
        stopped.kill()
        stopped.wait()


def test_pipeline_watch_sees_a_killed_pipeline_even_before_it_is_reaped():
    from rlhf.processes import _same_process_alive, _start_time

    pipeline = subprocess.Popen(["sleep", "60"])
    identity = (pipeline.pid, _start_time(pipeline.pid))
    assert _same_process_alive(*identity)
    os.kill(pipeline.pid, signal.SIGKILL)
    time.sleep(0.3)  # a zombie now: killed, not yet reaped by its parent
    assert not _same_process_alive(*identity)
    pipeline.wait()
    assert not _same_process_alive(*identity)


def test_a_finished_command_destroys_its_process_group_but_a_failed_one_leaves_it(tmp_path):
    """Left to interpreter shutdown, gloo's worker threads can abort a process that has done its work (SIGABRT,
    "terminate called without an active exception"), which fails a multi-process run after it succeeded."""
    import torch.distributed as dist

    from rlhf.config import ConfigError
    from rlhf.processes import run_main

    def failing(argv):
        raise ConfigError("bad recipe")

    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        assert run_main(failing, "sft", []) == 1 and dist.is_initialized()  # others may still be mid-collective
        assert run_main(lambda argv: dist.barrier(), "sft", []) == 0 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
