"""Stage outputs: write, read and resolve `manifest.json`, the record that hands one stage's checkpoint to the next.

A stage folder is done exactly when its manifest exists: the manifest is written last, atomically (temp file +
rename), so a stage killed half-way is never taken as finished.

    <output_dir>/
      adapter/        LoRA adapter (safetensors) + tokenizer   -> PeftModel.from_pretrained(base, adapter/)
      merged/         base with the adapter merged (optional)  -> AutoModelForCausalLM.from_pretrained(merged/)
      checkpoints/    trainer checkpoints, for resuming
      manifest.json   stage, base model, parent, paths, resolved config + hash, versions, metrics
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A parent stage that is missing, unfinished or of the wrong kind."""


@dataclass
class Manifest:
    stage: str
    output_dir: str
    base_model: str
    adapter_path: str | None = None
    merged_path: str | None = None
    parent: str | None = None  # parent stage folder
    parent_manifest: dict | None = None  # the parent's manifest, embedded so a run's lineage survives moves
    config: dict = field(default_factory=dict)
    config_hash: str = ""
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # stage-specific facts (e.g. how the reference model is built)
    versions: dict = field(default_factory=dict)
    created: str = ""
    manifest_version: int = MANIFEST_VERSION

    def path(self, relative: str | None) -> str | None:
        """A path recorded relative to the stage folder, made absolute."""
        return None if relative is None else str(Path(self.output_dir) / relative)


def config_hash(config: dict) -> str:
    """Stable hash of a resolved config: same recipe and overrides -> same hash, whatever the key order."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ["rlhf", "torch", "transformers", "trl", "peft", "accelerate", "datasets"]:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write via a temp file in the same folder and rename, so readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode any new file gets, so teammates can read runs.
        os.chmod(temp_name, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as temp_file:
            temp_file.write(content.encode("utf-8") if isinstance(content, str) else content)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def read_jsonl_log(path: Path) -> list[dict]:
    """The rows of a JSON-lines log a stage appends to (metrics.jsonl, gold_curve.jsonl), up to a last line a kill
    may have cut short."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_jsonl_log(path: Path, last_step: int) -> None:
    """Keep only the rows of steps up to last_step, the step a resumed run goes on after."""
    if path.is_file():
        kept = [row for row in read_jsonl_log(path) if row.get("step", 0) <= last_step]
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))


def write_manifest(manifest: Manifest) -> Path:
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.versions = manifest.versions or package_versions()
    manifest.config_hash = manifest.config_hash or config_hash(manifest.config)
    record = {key: value for key, value in manifest.__dict__.items() if key != "output_dir"}
    path = Path(manifest.output_dir) / MANIFEST_NAME
    atomic_write(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(stage_dir: str | os.PathLike) -> Manifest:
    stage_dir = Path(stage_dir)
    path = stage_dir / MANIFEST_NAME
    if not stage_dir.is_dir():
        raise ManifestError(f"stage folder {stage_dir} does not exist (run that stage first, or fix init_from)")
    if not path.is_file():
        raise ManifestError(
            f"{stage_dir} has no {MANIFEST_NAME}: that stage did not finish (rerun it; it resumes from its checkpoints)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in ("stage", "base_model") if key not in record]
    if missing:
        raise ManifestError(f"{path}: missing field(s) {', '.join(missing)}; expected a manifest written by rlhf")
    known = {key: value for key, value in record.items() if key in Manifest.__dataclass_fields__}
    return Manifest(output_dir=str(stage_dir), **known)


def resolve_parent(stage_dir: str | os.PathLike, expected_stages: tuple[str, ...]) -> Manifest:
    """Read a parent stage's manifest and check it is a stage this one can start from."""
    manifest = read_manifest(stage_dir)
    if manifest.stage not in expected_stages:
        raise ManifestError(
            f"{stage_dir} is the output of stage '{manifest.stage}', but this stage starts from "
            f"{' or '.join(repr(stage) for stage in expected_stages)}"
        )
    return manifest


def is_complete(stage_dir: str | os.PathLike, expected_hash: str | None = None) -> bool:
    """True when the stage folder holds a finished manifest (with the given config hash, if one is given)."""
    try:
        manifest = read_manifest(stage_dir)
    except ManifestError:
        return False
    return expected_hash is None or manifest.config_hash == expected_hash
