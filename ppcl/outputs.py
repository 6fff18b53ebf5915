"""Where a command may write: the one output rule of every ``ppcl`` command that has ``--out``.

The rule (issue 13): a command writes only into a NEW path, an empty folder, or a previous output of the SAME
command. Anything else at ``--out`` is refused in one line unless ``--overwrite`` is given, and even then a
path that is, or holds anywhere inside, an output of ANOTHER ppcl command (a teacher pipeline, a shard set, a
cache, a distill run, a probe, a plan...) is never removed.

How an output is recognised (:func:`identify`):
- a folder written by a command carries ``.ppcl-output.json`` = ``{"command", "version"}`` (written into the
  temporary folder before the atomic rename, so the folder appears with it; folders written in place get it
  when the command succeeds);
- outputs without the marker (older versions, a run killed mid-way) by their known files: ``manifest.json``
  of kind ``ppcl.shards`` / ``ppcl.latent_cache``, ``run.json`` or ``checkpoints/`` (distill), ``probe.json``,
  ``metrics.json`` + ``grid.png`` (evaluate), ``report.html`` (report), ``compare.md``, ``quality.json``
  (bench) and ``model_index.json`` (a diffusers pipeline: a teacher or an export, never replaced without its
  marker);
- single-file outputs by their own content: a plan (JSON with family/teacher/intervals/params) is ``select``'s,
  a compiled KFP pipeline YAML is ``pipeline compile``'s.

``--overwrite`` of an existing target moves it aside (``.NAME.ppcl-replaced-XXXX`` beside it) before the
command runs, deletes it when the command succeeds and puts it back when the command fails, so a failed
replacement loses nothing. Every written path is also held under an exclusive non-blocking ``flock`` for the
whole command (:func:`lock`), so a second writer of the same ``--out`` is refused at once. Lock files live in
``$TMPDIR/ppcl-locks-<uid>`` (keyed by the resolved path), never in the user's tree; they serialise the processes of
one machine, not of several machines sharing a network file system. ``s3://`` outputs are not checked here
(their writers upload atomically object by object).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from ppcl import atomic
from ppcl.errors import PPCLError

MARKER = ".ppcl-output.json"

#: Commands whose ``--out`` is one file (recognised by content, no marker); every other ``--out`` is a folder.
FILE_COMMANDS = frozenset({"select", "pipeline compile", "lora remap", "lora transfer"})
#: Commands whose own output legitimately holds other stages' outputs (the bench's OUT/work: cache, runs...).
NESTING_COMMANDS = frozenset({"bench quality"})
#: Files a command writes at the top of its own folder that read like another command's output: part of it
#: (an export carries the plan it was built from, ``ppcl.lineage``), so re-running into that folder is allowed.
OWN_FILES = {"export": frozenset({"plan.json"})}
#: errno values that describe the user's environment (a read-only mount, a full disk, a path that cannot
#: exist), shown as one line by the CLI; any other OSError is a bug and keeps its traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                                errno.ENAMETOOLONG})  # fmt: skip

_DESCRIBE = {
    "pipeline": "a diffusers pipeline (a teacher or an exported model)",
    "shard": "a shard set from `ppcl shard`",
    "encode": "a latent cache from `ppcl encode`",
    "distill": "a distill run",
    "select": "a plan from `ppcl select`",
}


def describe(command: str) -> str:
    return _DESCRIBE.get(command, f"an output of `ppcl {command}`")


def _json(path: Path, limit: int = 1 << 20):
    try:
        if path.stat().st_size > limit:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _is_plan(data) -> bool:
    return isinstance(data, dict) and {"family", "teacher", "intervals", "params"} <= data.keys()


def identify(path: str | os.PathLike) -> str | None:
    """The command that wrote ``path`` (see the module doc), ``"pipeline"`` for an unmarked diffusers
    pipeline, or None for anything else (including a missing path)."""
    path = Path(path)
    if path.is_dir():
        marker = _json(path / MARKER)
        if isinstance(marker, dict) and isinstance(marker.get("command"), str):
            return marker["command"]
        manifest = _json(path / "manifest.json") if (path / "manifest.json").is_file() else None
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        if kind == "ppcl.shards":
            return "shard"
        if kind == "ppcl.latent_cache":
            return "encode"
        if (path / "model_index.json").is_file():
            return "pipeline"
        if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
            return "distill"
        if (path / "probe.json").is_file():
            return "probe"
        if (path / "metrics.json").is_file() and (path / "grid.png").is_file():
            return "evaluate"
        if (path / "quality.json").is_file():
            return "bench quality"
        if (path / "compare.md").is_file():
            return "compare"
        if (path / "report.html").is_file():
            return "report"
        return None
    if path.is_file():
        if path.suffix == ".json" and _is_plan(_json(path)):
            return "select"
        if path.suffix == ".safetensors":
            return _safetensors_command(path)
        if path.suffix in (".yaml", ".yml"):
            try:
                with open(path, "rb") as f:
                    head = f.read(1 << 16)
            except OSError:
                return None
            if b"pipelineInfo:" in head and (b"deploymentSpec:" in head or b"components:" in head):
                return "pipeline compile"
    return None


def _safetensors_command(path: Path) -> str | None:
    """A LoRA written by ``ppcl lora``: its header metadata ``ppcl`` = ``{"command": ...}`` (ppcl.lora)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= 1 << 24 else None
        meta = json.loads(header["__metadata__"]["ppcl"])
        command = meta["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return command if command in ("lora remap", "lora transfer") else None


def nested_output(path: Path, max_depth: int | None = None,
                  own: frozenset[str] = frozenset()) -> tuple[Path, str] | None:
    """The first (path, command) of a ppcl output strictly inside folder ``path`` (at most ``max_depth``
    levels down; files named in ``own`` at its top are its own), or None."""
    for root, dirs, files in os.walk(path):
        root_p = Path(root)
        dirs.sort()
        if max_depth is not None and len(root_p.relative_to(path).parts) >= max_depth:
            dirs.clear()
        if root_p != path:
            found = identify(root_p)
            if found is not None:
                return root_p, found
        for name in sorted(files):
            if root_p == path and name in own:
                continue
            if name.endswith(".json") and name != MARKER and identify(root_p / name) == "select":
                return root_p / name, "select"
    return None


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_target(command: str, out: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Apply the output rule to ``out`` for ``command``. Returns True when an existing target is to be
    replaced as a whole (``--overwrite`` given and allowed), False when the command may write as it always
    does (a new path, an empty folder, or its own earlier output, which it replaces or updates itself).

    Raises PPCLError (one line naming the path) when the target may not be written."""
    path = Path(out)
    if not path.exists() and not path.is_symlink():
        return False
    if _empty_dir(path):
        return False
    own = identify(path)
    wants_folder = command not in FILE_COMMANDS
    if own == command and path.is_dir() == wants_folder:
        if wants_folder and command not in NESTING_COMMANDS:
            inner = nested_output(path, own=OWN_FILES.get(command, frozenset()))
            if inner is not None:
                raise PPCLError(f"--out {path} holds another ppcl output ({inner[0]}: {describe(inner[1])}); "
                                f"it is never replaced: choose another --out")  # fmt: skip
        return overwrite
    if own is not None:
        raise PPCLError(f"--out {path} is {describe(own)}, not an output of `ppcl {command}`; it is never "
                        f"replaced, even with --overwrite: choose another --out")  # fmt: skip
    if path.is_dir() and not path.is_symlink():
        # Without --overwrite the answer is "no" anyway: look only near the top (a huge folder stays quick).
        inner = nested_output(path, None if overwrite else 2)
        if inner is not None:
            raise PPCLError(f"--out {path} holds other ppcl outputs ({inner[0]}: {describe(inner[1])}); it is "
                            f"never replaced, even with --overwrite: choose another --out")  # fmt: skip
    if not overwrite:
        what = "folder" if path.is_dir() else "file"
        raise PPCLError(f"--out {path} is an existing {what} that is not an output of `ppcl {command}`: "
                        f"pass --overwrite to replace it, or choose another --out")  # fmt: skip
    return True


def check_writable(out: str | os.PathLike) -> None:
    """Fail now, not after an hour of work, when ``out`` cannot be created: its first existing ancestor must
    be a folder in which a file can be created (a real probe: root ignores permission bits, a read-only
    mount does not)."""
    path = Path(out).absolute()
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise PPCLError(f"--out {out}: {anc} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=anc, prefix=".ppcl-probe-"):
            pass
    except OSError as e:
        raise PPCLError(f"--out {out}: cannot write in {anc}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------- locking

_held: dict[str, list[int]] = {}  # lock file -> [fd, holders]: re-entrant within one process


def _lock_file(path: Path) -> Path:
    key = hashlib.sha256(str(path.absolute().resolve()).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / f"ppcl-locks-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.lock"


@contextlib.contextmanager
def lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the output ``out`` for the block; refuse at once if another process holds it.

    Re-entrant in one process (the CLI holds it and a stage function may take it again): the flock is dropped
    when the last holder leaves, whichever that is."""
    import fcntl

    path = Path(out)
    lf = str(_lock_file(path))
    if lf not in _held:
        fd = os.open(lf, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise PPCLError(f"--out {out} is being written by another process (pid {holder}): wait for it to "
                            f"finish or choose another --out") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[lf] = [fd, 0]
    entry = _held[lf]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            _held.pop(lf, None)
            os.close(entry[0])  # closing the descriptor releases the flock


def hold(out: str | os.PathLike) -> contextlib.ExitStack:
    """:func:`lock` for a function body: held until the returned stack is closed or dropped (a stage function
    keeps it in a local: returning or raising releases it)."""
    stack = contextlib.ExitStack()
    stack.enter_context(lock(out))
    return stack


# ----------------------------------------------------------------------------------------------- markers

_claims: dict[str, str] = {}  # resolved output path -> command writing it in this process


def _key(path: str | os.PathLike) -> str:
    return str(Path(path).absolute().resolve())


def write_marker(folder: str | os.PathLike, command: str) -> None:
    from ppcl import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"command": command, "version": __version__}) + "\n")


def on_folder_complete(final: Path, tmp: Path) -> None:
    """Called by :func:`ppcl.atomic.atomic_path` before a finished folder is renamed into place: a folder that
    is the claimed ``--out`` of a running command gets its marker inside the rename."""
    command = _claims.get(_key(final))
    if command is not None and command not in FILE_COMMANDS:
        write_marker(tmp, command)


# a claim exists only inside guard(), i.e. only once this module is imported: registering at import suffices
atomic.FOLDER_COMPLETE_HOOKS.append(on_folder_complete)


# ----------------------------------------------------------------------------------------------- the guard


def rank_writes() -> bool:
    """Processes started by torchrun all parse the same --out; the first process of each machine locks it."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


@contextlib.contextmanager
def guard(command: str, out: str | os.PathLike | None, *, overwrite: bool = False,
          resume: bool = False) -> Iterator[None]:  # fmt: skip
    """Everything the output rule needs around one command writing ``out`` (see the module doc)."""
    from ppcl import storage

    if out is None or storage.is_s3(str(out)) or not rank_writes():
        yield
        return
    path = Path(out)
    if resume and overwrite:
        raise PPCLError("--resume continues the run in --out; --overwrite replaces it: pass one of them")
    check_writable(path)
    with lock(path):
        replace = False if resume else check_target(command, path, overwrite=overwrite)
        if resume and path.exists() and not _empty_dir(path) and identify(path) != command:
            raise PPCLError(f"--out {path} is not a `ppcl {command}` run: nothing to resume")
        aside = None
        if replace:
            aside = path.with_name(f".{path.name}.ppcl-replaced-{uuid.uuid4().hex[:8]}")
            os.replace(path, aside)
        key = _key(path)
        _claims[key] = command
        try:
            yield
        except BaseException:
            if aside is not None:  # put the old output back: a failed replacement loses nothing
                _remove(path)
                os.replace(aside, path)
            raise
        finally:
            _claims.pop(key, None)
        if aside is not None:
            _remove(aside)
        if command not in FILE_COMMANDS and path.is_dir() and not (path / MARKER).exists():
            write_marker(path, command)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
