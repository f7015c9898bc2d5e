"""wandb gets the metrics every stage logs: an offline run (no network, no API key) under <output_dir>/logs/wandb,
read back from its .wandb file and compared with what the stage wrote itself."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.manifest import read_jsonl_log

from conftest import REPO

pytest.importorskip("wandb")


def offline_wandb_env(tmp_path: Path) -> dict:
    """wandb offline with nowhere to send anything: no API key, a server address nothing listens on, no error
    reports, its settings and caches in tmp_path (never the user's ~/.config/wandb or ~/.netrc)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    home = tmp_path / "wandb-home"
    env.update(WANDB_MODE="offline", WANDB_BASE_URL="http://127.0.0.1:9", WANDB_ERROR_REPORTING="false",
               WANDB_DISABLE_GIT="true", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(home / "config"),
               WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"), NETRC=str(home / "netrc"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run_cli(argv: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", *argv], cwd=REPO, env=offline_wandb_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def wandb_history(logs: Path) -> list[dict]:
    """The history rows of the one offline run under logs/wandb. A .wandb file is a LevelDB-style log (a 7-byte
    header, then 32 KiB blocks of records: CRC32, length, type FULL/FIRST/MIDDLE/LAST, payload) of wandb's Record
    protobufs; wandb itself no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (logs / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32 * 1024, 7
    offset, payload, rows = 7, b"", []
    while offset + header <= len(data):
        if block - offset % block < header:  # a block's tail too short for a record header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + header])
        if kind == 0:
            break
        payload += data[offset + header : offset + header + length]
        offset += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_sft_logs_to_wandb_offline(tmp_path):
    output_dir = tmp_path / "sft"
    run_cli(["sft", "--config", "recipes/tiny/sft.yaml", "--output_dir", str(output_dir), "--max_steps", "2",
             "--logging_steps", "1", "--max_train_samples", "32", "--eval_data", "", "--gold_eval_prompts", "",
             "--save_merged", "false", "--report_to", "wandb"], tmp_path)
    # Every logged step reached wandb and metrics.jsonl with the values the trainer logged (its log history, kept
    # in the checkpoint).
    rows = [row for row in wandb_history(output_dir / "logs") if "train/loss" in row]
    state = json.loads((output_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    metrics = [row for row in read_jsonl_log(output_dir / "metrics.jsonl") if "loss" in row]
    assert ([row["train/global_step"] for row in rows] == [entry["step"] for entry in logged]
            == [row["step"] for row in metrics] == [1, 2])
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [row[f"train/{key}"] for row in rows] == pytest.approx([entry[key] for entry in logged]), key
        assert [row[key] for row in metrics] == pytest.approx([entry[key] for entry in logged]), key
    assert not list((output_dir / "checkpoints").rglob("*.wandb"))  # under logs/, not in the checkpoints


def test_ppo_logs_every_metric_to_wandb_offline(sft_run, reward_run, tmp_path):
    output_dir = tmp_path / "ppo"
    run_cli(["ppo", "--config", "recipes/tiny/ppo.yaml", "--init_from", sft_run.output_dir,
             "--reward_model", reward_run.output_dir, "--output_dir", str(output_dir), "--steps", "2",
             "--rollout_batch_size", "8", "--mini_batch_size", "4", "--ppo_epochs", "1", "--max_new_tokens", "16",
             "--gold_eval_prompts", "", "--save_merged", "false", "--report_to", "wandb"], tmp_path)
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in wandb_history(output_dir / "logs") if "score/raw" in row]
    assert [row["_step"] for row in rows] == [row["step"] for row in metrics] == [1, 2]
    for row, logged in zip(rows, metrics):
        assert {key: row[key] for key in logged} == pytest.approx(logged)  # every metric of metrics.jsonl
