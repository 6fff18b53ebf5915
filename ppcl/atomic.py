"""Write outputs so that nothing half-written ever sits under a final name.

Every file or folder another stage reads is produced under a temporary sibling name and renamed into place
only when complete; on any exception the temporary is removed and the final name is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


#: ``hook(final, tmp)`` called before a finished temporary folder is renamed to ``final``. Modules above this
#: one register here (:mod:`ppcl.outputs` adds its marker) so that this module depends on none of them.
FOLDER_COMPLETE_HOOKS: list[Callable[[Path, Path], None]] = []


def _tmp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` when the block succeeds.

    Args:
        final: the file or folder that must appear complete or not at all.
        directory: create the temporary as a folder (for outputs that are folders).
        overwrite: replace an existing ``final``; with False an existing one is an error.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            for hook in FOLDER_COMPLETE_HOOKS:  # e.g. the --out of a running command appears with its marker
                hook(final, tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            # Folders cannot be replaced in one rename: move the old one aside first, then drop it.
            old = _tmp_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_json(final: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``final`` atomically; returns the final path."""
    final = Path(final)
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return final


def write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``final`` atomically (fsync before the rename)."""
    final = Path(final)
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return final
