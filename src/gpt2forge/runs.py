"""The run directory, owned here: what its files are called and how to read them.

``out/<run>/`` holds ``config.toml`` (the resolved config), ``metrics.csv`` (one row per logged step and per
evaluation, columns ``COLUMNS``), ``train.log``, ``run.json`` (one record per launch: command, versions,
hardware), ``latest`` (the name of the newest complete checkpoint), the checkpoints ``step-NNNNNN/``,
``tracker_id`` (the run's id for W&B and the like), and ``.lock`` (``RunLock``: held by the launch that trains in
it; it names that launch). The lifecycle of these files in a launch is ``train/rundir.py``'s. A
checkpoint directory holds one file per stateful piece of the run (``train/checkpoint.py`` writes them) and a
``manifest.json`` with every file's size and sha256, written last: a checkpoint is complete exactly when its
manifest is there, and verified when its files still match it.

Training, evaluation, reports and weight loading all find their way through these functions, so the layout is
defined once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError
from .files import atomic_write_json

try:
    import fcntl
except ImportError:  # pragma: no cover -- not POSIX: the lock is only the record in the file
    fcntl = None

LATEST = "latest"
MANIFEST = "manifest.json"
RUN_CONFIG = "config.toml"
METRICS = "metrics.csv"
RUN_RECORD = "run.json"
TRAIN_STATE = "train_state.json"
LOCK = ".lock"
TRACKER_ID = "tracker_id"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
LEGACY_PIECES = ("model.safetensors", "optimizer.pt", "train_state.json", "rng.pt", "config.toml")  # before manifests
COLUMNS = (
    "step", "tokens", "elapsed_s", "loss", "lr", "grad_norm", "step_ms", "tokens_per_s", "mfu", "mfu_llmc",
    "val_loss", "hellaswag_acc", "hellaswag_acc_norm",
    "val_bpb", "core",  # appended last: a resumed run's older metrics.csv header still lines up with its rows
)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    """A ``step-N`` directory whose save finished (its manifest was written last; older ones: every piece)."""
    if not (path.is_dir() and STEP_DIR.match(path.name)):
        return False
    return (path / MANIFEST).is_file() or all((path / p).is_file() for p in LEGACY_PIECES)


def step_dirs(run_dir: Path) -> list[Path]:
    """Every ``step-N`` directory of a run, complete or not, by step, oldest first. A save only ever renames a
    finished ``step-N.tmp`` to ``step-N``, so one of these that is not complete and verified is damaged."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=checkpoint_step)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, by step, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if is_complete(p)), key=checkpoint_step)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names when it is complete, else the complete one with the highest step."""
    latest = run_dir / LATEST
    if latest.is_file():
        named = run_dir / latest.read_text().strip()
        if is_complete(named):
            return named
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run directory resolves to the checkpoint its ``latest`` pointer names; other paths are returned as is."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not target.is_dir():
            raise UserError(f"{latest} points to {target.name}, which does not exist")
        return target
    return path


def file_digest(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a checkpoint directory, its subdirectories included (a sharded checkpoint's shards:
    ``sharded/__0_0.distcp``, ...), with its size and sha256 (the last file a save writes)."""
    files = {p.relative_to(checkpoint).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p != checkpoint / MANIFEST}
    atomic_write_json(checkpoint / MANIFEST, {"files": files})


def checkpoint_problems(checkpoint: Path, full: bool = True) -> list[str]:
    """What is wrong with a checkpoint against its manifest (missing/extra-size/hash mismatch), [] if intact.
    ``full=False`` checks sizes only (no reading)."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        if all((checkpoint / p).is_file() for p in LEGACY_PIECES):
            return []  # written before checkpoints had manifests: nothing to check against
        return [f"no {MANIFEST} (a save renames a checkpoint into place only after writing it)"]
    try:
        files = json.loads(manifest.read_text())["files"]
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"unreadable {MANIFEST} ({type(e).__name__}: {e})"]
    problems = []
    for name, (size, sha256) in files.items():
        path = checkpoint / name
        try:
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{name} has {path.stat().st_size:,} bytes, the manifest says {size:,}")
            elif full and file_digest(path) != sha256:
                problems.append(f"{name} does not match its sha256 (damaged)")
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror})")
    return problems


def read_train_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / TRAIN_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint / TRAIN_STATE}: unreadable ({e})") from None


def training_position(checkpoint: Path | None) -> tuple[int | None, int | None]:
    """(step, tokens seen) of a checkpoint: from its train state, else the step from a ``step-N`` name."""
    if checkpoint is None:
        return None, None
    try:
        state = read_train_state(checkpoint)
        return int(state["step"]), int(state["tokens"]) if "tokens" in state else None
    except (UserError, ValueError, KeyError, TypeError):
        match = STEP_DIR.match(checkpoint.name)
        return (int(match.group(1)) if match else None), None


def append_launch(run_dir: Path, launch: dict) -> list[str]:
    """Add one launch to ``run.json`` (atomically); returns warnings (an unreadable record is started afresh)."""
    path, warnings = run_dir / RUN_RECORD, []
    record = {"launches": []}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            warnings.append(f"{path} is unreadable; starting a new record of launches")
    record["launches"].append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **launch})
    atomic_write_json(path, record)
    return warnings


def set_aside(run_dir: Path) -> Path | None:
    """Move a run's training history (checkpoints of every kind, ``latest``, ``metrics.csv``, ``config.toml``,
    TensorBoard events, the tracker id) into ``RUN_DIR/previous-<UTC time>/`` so that the run can start over
    without deleting anything. ``train.log`` and ``run.json`` stay: they record every launch. Returns the folder,
    or None."""
    names = {LATEST, METRICS, RUN_CONFIG, TRACKER_ID, "tensorboard"}
    moving = [p for p in sorted(run_dir.iterdir()) if p.name in names or p.name.startswith("step-")]
    if not moving:
        return None
    target = run_dir / f"previous-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir()
    for path in moving:
        os.replace(path, target / path.name)
    return target


# ---------------------------------------------------------------- the lock
LOCK_HEARTBEAT_S = 30.0  # the holder touches its lock file this often
LOCK_STALE_S = 300.0  # a record left by another host, untouched this long, is presumed dead


class RunLocked(UserError):
    """Another launch holds the run directory."""


class RunLock:
    """The run directory's exclusive lock, held by the main rank for the whole of a training launch.

    ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel releases it when its holder dies, however it dies, so on one
    host a lock is never stale. The file records who holds it (pid, host, start time, command) for the message a
    second launch gets; it is emptied on release, so a record found on acquiring says that the previous holder
    was killed. The holder touches the file every ``LOCK_HEARTBEAT_S``: a record left by a process on *another*
    host (network filesystems do not all carry flock across hosts) is honoured while it was touched within
    ``LOCK_STALE_S`` (the launch is refused), and taken over with a warning after that.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.file = None
        self.created = False  # whether acquiring made the run directory (a failed launch then removes it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, command: str = "") -> list[str]:
        """Take the lock, creating the run directory; raise ``RunLocked`` naming the holder. Returns warnings.
        Filesystem errors (the directory cannot be created or written) propagate as ``OSError``."""
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # created if missing, never truncated before it is ours
        try:
            warnings, kernel_lock = [], fcntl is not None
            if kernel_lock:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunLocked(
                        f"{self.run_dir} is in use by another training launch: {describe_holder(read_holder(f))}. "
                        "Wait for it to finish, or stop it (kill -TERM on its pid saves a checkpoint and exits); to "
                        "train something else meanwhile, choose another --log.run_name"
                    ) from None
                except OSError as e:  # a filesystem without flock (ENOLCK, EOPNOTSUPP)
                    kernel_lock = False
                    warnings.append(f"{self.path}: this filesystem cannot lock files ({e.strerror}); relying on the "
                                    "holder's record alone")
            previous = read_holder(f)
            if previous:
                warnings += self._left_behind(previous, f, kernel_lock)
            f.seek(0)
            f.truncate()
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command}, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            raise
        self.file = f
        self._thread = threading.Thread(target=self._heartbeat, name="gpt2forge-run-lock", daemon=True)
        self._thread.start()
        return warnings

    def _left_behind(self, holder: dict, f, kernel_lock: bool) -> list[str]:
        """A record the previous holder did not clear: refuse while that holder may be alive, else a warning."""
        who = describe_holder(holder)
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not kernel_lock and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
                raise RunLocked(f"{self.run_dir} is in use by another training launch: {who}. Wait for it to "
                                "finish or stop it; to train something else meanwhile, choose another --log.run_name")
            return [f"the previous launch in {self.run_dir} ({who}) ended without releasing it (killed?); "
                    "taking over"]
        age = time.time() - os.fstat(f.fileno()).st_mtime
        if age < LOCK_STALE_S:
            raise RunLocked(
                f"{self.run_dir} may be in use by a launch on another host: {who}, last alive {age:.0f} s ago, which "
                f"this host cannot check. If it is gone, launch again once {LOCK_STALE_S / 60:.0f} minutes have passed "
                f"since then, or delete {self.path} now"
            )
        return [f"taking over {self.path} from {who}: no sign of life for {age / 60:.0f} minutes, presumed dead"]

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Clear the record and unlock (also done by the kernel, minus the clearing, when the process dies). A
        directory this lock created and nothing else wrote into (a launch that failed at start-up) is removed."""
        if self.file is None:
            return
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            self.path.unlink()
            self.run_dir.rmdir()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.flush()
        except OSError:
            pass
        try:
            if fcntl is not None:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        except OSError:
            pass
        self.file.close()
        self.file = None


def read_holder(f) -> dict:
    """The record in an open lock file ({} when empty or unreadable)."""
    try:
        f.seek(0)
        holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that has not written its name yet"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
    command = str(holder.get("command") or "")
    return text + (f" ({command[:160]}{'…' if len(command) > 160 else ''})" if command else "")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def format_duration(seconds: float) -> str:
    """3725 → 1h02m: wall times and ETAs at a glance."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
