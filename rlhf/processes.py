"""How a stage's processes start, watch each other and end.

- `start_processes` joins the process group (with a collective timeout) and refuses a launch that started several
  processes which accelerate then runs each alone: they would all train their own copy into one output folder.
- A watch thread in every process touches `<output_dir>/.heartbeat/rank<N>` while the run is multi-process, so the
  rank whose collective times out can say which rank stopped answering; under `rlhf pipeline` it also ends the stage
  when the pipeline that started it is gone (killed, even with SIGKILL), so no orphan keeps training.
- `run_main` is every command's entry point: a bad recipe, bad data or a refused stage prints one line and exits 1;
  a collective timeout prints which rank stopped answering and ends the process at once.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from pathlib import Path


class StageError(RuntimeError):
    """A stage that cannot go on (lock held, loss diverged); the message says what happened and what was kept."""


PIPELINE_PID_ENV = "RLHF_PIPELINE_PID"  # set by `rlhf pipeline` for the stages it launches
ERROR_FILE_ENV = "RLHF_ERROR_FILE"  # where a stage writes its one-line error, for the pipeline to repeat last
HEARTBEAT_SECONDS = 1.0
HEARTBEAT_DIR = ".heartbeat"


def launched_world_size() -> int:
    """How many processes the launcher (torchrun / accelerate launch / mpirun) says it started."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0


def start_processes(ddp_timeout: float | None = None):
    """The process group this stage runs in (accelerate's PartialState), created with `ddp_timeout` seconds as the
    collective timeout unless the TRL config already created it (it passes its own ddp_timeout). Refuses a launch
    whose processes cannot see each other, before anything is loaded or written."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from rlhf.config import ConfigError

    kwargs = {"timeout": datetime.timedelta(seconds=ddp_timeout)} if ddp_timeout else {}
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)
    launched = launched_world_size()
    if launched > 1 and state.num_processes == 1:
        import torch

        reason = ("this machine has no GPU and ACCELERATE_USE_CPU is not set" if not torch.cuda.is_available()
                  else f"accelerate set up a single-process run ({state.distributed_type})")
        raise ConfigError(
            f"this launch started {launched} processes (WORLD_SIZE={launched}), but {reason}, so each would run "
            "alone and train its own copy into the same output folder. Fix: for CPU processes set "
            "ACCELERATE_USE_CPU=1 (ACCELERATE_USE_CPU=1 accelerate launch --config_file "
            "recipes/accelerate/cpu_2proc.yaml ...), or launch one process (--config_file recipes/accelerate/cpu.yaml)"
        )
    watch = ProcessWatch.current()
    watch.rank, watch.world_size, watch.ddp_timeout = state.process_index, state.num_processes, ddp_timeout
    return state


class ProcessWatch:
    """One daemon thread per process: heartbeats for the other ranks, and the end of the stage when its pipeline
    dies. Created on first use (never at import)."""

    _instance: ProcessWatch | None = None

    def __init__(self):
        self.rank, self.world_size, self.ddp_timeout = process_rank(), 1, None
        self.heartbeat_dir: Path | None = None
        self.pipeline = _pipeline_identity()
        self._thread: threading.Thread | None = None

    @classmethod
    def current(cls) -> ProcessWatch:
        if cls._instance is None:
            cls._instance = cls()
            cls._instance._start_if_needed()
        return cls._instance

    def beat_into(self, output_dir: str | os.PathLike) -> None:
        """Start heartbeats under output_dir (multi-process runs only: one process has no one to wait for it)."""
        if self.world_size <= 1:
            return
        self.heartbeat_dir = Path(output_dir) / HEARTBEAT_DIR
        self.heartbeat_dir.mkdir(parents=True, exist_ok=True)
        beat = self.heartbeat_dir / f"rank{self.rank}"
        beat.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        self._start_if_needed(force=True)

    def _start_if_needed(self, force: bool = False) -> None:
        if self._thread is None and (force or self.pipeline is not None):
            self._thread = threading.Thread(target=self._run, name="rlhf-process-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            if self.pipeline is not None and not _same_process_alive(*self.pipeline):
                print(f"[rlhf] the pipeline (pid {self.pipeline[0]}) that started this stage has ended; stopping "
                      "this stage too (rerun the pipeline to resume it)", file=sys.stderr, flush=True)
                os._exit(143)
            if self.heartbeat_dir is not None:
                try:
                    os.utime(self.heartbeat_dir / f"rank{self.rank}")
                except OSError:
                    pass  # the folder went away (overwrite, cleanup): heartbeats are advisory
            time.sleep(HEARTBEAT_SECONDS)

    def silent_ranks(self) -> list[str]:
        """A line per rank that stopped sending heartbeats (stopped, hung, dead), from the files the ranks touch."""
        if self.heartbeat_dir is None:
            return []
        found, now = [], time.time()
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            beat = self.heartbeat_dir / f"rank{rank}"
            if not beat.is_file():
                found.append(f"rank {rank}: no heartbeat file in {self.heartbeat_dir} (another machine, or it "
                             "never started)")
                continue
            age = now - beat.stat().st_mtime
            pid, host = (beat.read_text().split() + ["?", "?"])[:2]
            state = _local_process_state(pid) if host == socket.gethostname() else None
            if state == "gone":
                found.append(f"rank {rank} (pid {pid}) has exited")
            elif state == "stopped":
                found.append(f"rank {rank} (pid {pid}) is stopped (SIGSTOP or a debugger): last heartbeat "
                             f"{age:.0f} s ago")
            elif age > 5 * HEARTBEAT_SECONDS:
                found.append(f"rank {rank} (pid {pid} on {host}) stopped answering: last heartbeat {age:.0f} s ago")
        return found


def _pipeline_identity() -> tuple[int, str] | None:
    value = os.environ.get(PIPELINE_PID_ENV, "")
    if not value.isdigit():
        return None
    return int(value), _start_time(int(value))


def _start_time(pid: int) -> str:
    """A process's start time (guards against a reused pid); empty where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _same_process_alive(pid: int, start_time: str) -> bool:
    """False once the process is gone, a zombie (killed but not yet reaped), or its pid was reused."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _local_process_state(str(pid)) != "gone" and _start_time(pid) == start_time


def _local_process_state(pid: str) -> str | None:
    """running, stopped or gone for a pid on this machine; None where /proc cannot tell."""
    if not pid.isdigit() or not Path("/proc/self").exists():
        return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(state, "running")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo and NCCL word these differently)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    # gloo raises a plain RuntimeError ("Timed out waiting ... for recv", "Connection closed by peer").
    return isinstance(error, RuntimeError) and any(
        phrase in text for phrase in ("timed out", "connection closed by peer", "connection reset by peer"))


def collective_failure_message(error: BaseException) -> str:
    watch = ProcessWatch.current()
    silent = watch.silent_ranks()
    limit = f" within ddp_timeout ({watch.ddp_timeout:g} s)" if watch.ddp_timeout else ""
    who = "; ".join(silent) if silent else (
        "every other rank is still alive, so one of them is stuck outside communication (a deadlock, or a step "
        "slower than the timeout)")
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"rank {watch.rank}: a collective operation did not complete{limit}: {who}. Ending this run; checkpoints "
            f"saved so far are kept and a rerun resumes from them. Raise ddp_timeout if steps legitimately take "
            f"longer. ({first_line})")


def report_error(command: str, message: str, every_rank: bool = False) -> None:
    """Say a stage's error once: on rank 0 (every rank meets the same bad input) unless each rank's view matters.
    Under `rlhf pipeline` it goes to the pipeline instead, which prints it last, after the launcher's own report."""
    if not (every_rank or process_rank() == 0):
        return
    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file:
        try:
            with open(error_file, "a") as handle:
                handle.write(message + "\n")
            return
        except OSError:
            pass
    print(f"rlhf {command}: error: {message}", file=sys.stderr, flush=True)


def run_main(main, command: str, argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`; return its exit code. Expected failures end in one line, not a traceback."""
    from rlhf.config import ConfigError
    from rlhf.data import DataError
    from rlhf.manifest import ManifestError

    try:
        main(argv)
    except (ConfigError, DataError, ManifestError, StageError) as error:
        report_error(command, str(error))
        return 1
    except Exception as error:
        if not is_collective_failure(error):
            raise
        report_error(command, collective_failure_message(error), every_rank=True)
        os._exit(1)  # the process group is broken: shutting it down cleanly could wait forever
    end_processes()
    return 0


def end_processes() -> None:
    """Destroy the process group once a command has finished. Left to interpreter shutdown, gloo's worker threads can
    still hold tensors while Python is torn down, and the process aborts (SIGABRT, "terminate called without an active
    exception") after it has done its work. Only after success: a rank that failed may leave others mid-collective,
    and they end by their own timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resident_mib() -> tuple[float, float]:
    """(resident set now, its peak so far) of this process, in MiB (Linux /proc; elsewhere the peak for both). The
    peak is never reset: that would also lower what the kernel reports as the process's peak when it exits."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        return peak, peak


def peak_memory_mib() -> float:
    """This process's peak memory so far, in MiB: GPU memory allocated by torch when it used a GPU, else its peak
    resident set."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resident_mib()[1]
