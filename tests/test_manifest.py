"""Manifests: round trip, atomic write, and the errors a later stage gets for a bad parent."""

import json

import pytest

from rlhf.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    is_complete,
    read_manifest,
    resolve_parent,
    write_manifest,
)


def make(tmp_path, stage="sft"):
    return Manifest(
        stage=stage,
        output_dir=str(tmp_path / stage),
        base_model="/models/base",
        adapter_path="adapter",
        config={"training": {"learning_rate": 1e-3}, "model": {"lora_r": 8}},
        metrics={"train_loss": 1.5},
    )


def test_round_trip_keeps_every_field(tmp_path):
    manifest = make(tmp_path)
    write_manifest(manifest)
    loaded = read_manifest(tmp_path / "sft")
    assert loaded == manifest
    assert loaded.path(loaded.adapter_path) == str(tmp_path / "sft" / "adapter")
    assert len(loaded.config_hash) == 16
    assert loaded.versions["torch"]


def test_write_leaves_no_temp_files_and_valid_json(tmp_path):
    write_manifest(make(tmp_path))
    files = sorted(path.name for path in (tmp_path / "sft").iterdir())
    assert files == [MANIFEST_NAME]
    assert json.loads((tmp_path / "sft" / MANIFEST_NAME).read_text())["stage"] == "sft"


def test_same_config_same_hash_and_is_complete(tmp_path):
    first, second = make(tmp_path), make(tmp_path, stage="reward")
    write_manifest(first)
    write_manifest(second)
    assert first.config_hash == second.config_hash
    assert is_complete(tmp_path / "sft", first.config_hash)
    assert not is_complete(tmp_path / "sft", "0" * 16)
    assert not is_complete(tmp_path / "nothing-here")


def test_missing_folder_and_unfinished_stage(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "sft")
    (tmp_path / "sft").mkdir()
    with pytest.raises(ManifestError, match="did not finish"):
        read_manifest(tmp_path / "sft")


def test_wrong_parent_stage_is_refused(tmp_path):
    write_manifest(make(tmp_path, stage="dpo"))
    with pytest.raises(ManifestError, match="output of stage 'dpo'.*starts from 'sft'"):
        resolve_parent(tmp_path / "dpo", ("sft",))


def test_corrupt_manifest_is_reported(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path / "sft")


def test_written_files_take_the_umask_not_the_private_mode_of_a_temp_file(tmp_path):
    import os

    from rlhf.manifest import atomic_write

    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "report.md", "hello")
        os.umask(0o027)
        atomic_write(tmp_path / "scores.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644  # teammates can read a run
    assert (tmp_path / "scores.json").stat().st_mode & 0o777 == 0o640
