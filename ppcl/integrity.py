"""Integrity checks between stages: manifests' checksums, safetensors files, the teacher's fingerprint.

Every stage verifies what its input manifest records before using it (shards -> encode, cache -> probe,
distill, evaluate, plugs -> export) and refuses mixed or stale data naming the FIRST file that does not match.

Decisions:
- A local file is checked by size first (cheap; catches truncation), then by the sha256 of its bytes; an S3
  object by its size and the ``sha256`` metadata :func:`ppcl.storage.upload_file` records (no download). A
  verified file is remembered for the process by (path, size, mtime) so a stage that opens its input several
  times hashes it once; under torchrun only local rank 0 hashes (the others check sizes). Hashing reads the
  input once more (~1-2 GB/s): small next to encoding or training on it.
- The teacher's fingerprint is the sha256 over ``transformer/config.json`` and the BYTES of every
  ``transformer/*.safetensors`` file (names sorted). Headers and sizes alone would not tell two teachers of the
  same architecture apart (same shapes, other weights), which is exactly the case to refuse. Hashing is about
  as fast as reading the weights once (~1-2 GB/s), which distill and export do anyway.
- :func:`check_safetensors` validates a file's header and size without reading its tensors, so a truncated
  weight file is one line naming it instead of a ``SafetensorError`` from deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ppcl import storage
from ppcl.errors import PPCLError

_verified: set[tuple[str, int, int, str]] = set()


def read_manifest(model, path: str, base: str, *, what: str, remedy: str, verify: bool = True):
    """The ``model`` (a pydantic manifest with ``shards`` of name/bytes/sha256) read from ``path``, every listed
    file under ``base`` verified when ``verify``; a garbled manifest or a damaged file is one line naming it."""
    from pydantic import ValidationError

    from ppcl.errors import first_field_error

    try:
        manifest = model.model_validate_json(storage.read_bytes(path))
    except ValidationError as e:
        field, msg = first_field_error(e)
        raise PPCLError(f"{path}: invalid {what}, field '{field}': {msg}") from e
    except UnicodeDecodeError:
        raise PPCLError(f"{path}: not a {what} (not UTF-8 JSON)") from None
    if verify:
        verify_files(base, [(s.name, s.bytes, s.sha256) for s in manifest.shards], what=what, remedy=remedy)
    return manifest


def verify_files(base: str, files: list[tuple[str, int, str]], *, what: str, remedy: str) -> None:
    """Check ``(name, bytes, sha256)`` of each file under ``base`` (a folder or s3:// prefix) in order;
    PPCLError naming the first missing or different file."""
    for name, nbytes, sha in files:
        path = storage.join(base, name)
        if storage.is_s3(base):
            try:
                meta = storage.head(path)
            except PPCLError:
                raise PPCLError(f"{path}: listed in the {what} but missing ({remedy})") from None
            recorded = meta.get("metadata", {}).get("sha256")
            if meta["size"] != nbytes or (recorded is not None and recorded != sha):
                raise PPCLError(f"{path}: does not match the {what} (size or sha256 differs): the data is mixed "
                                f"or stale ({remedy})")  # fmt: skip
            continue
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise PPCLError(f"{path}: listed in the {what} but missing ({remedy})") from None
        if st.st_size != nbytes:
            raise PPCLError(f"{path}: {st.st_size} bytes, the {what} records {nbytes} (truncated or replaced; "
                            f"{remedy})")  # fmt: skip
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, sha)
        if key in _verified or not _hashing_rank():
            continue
        if storage.sha256_file(p) != sha:
            raise PPCLError(f"{path}: sha256 differs from the {what}: the data is mixed or stale ({remedy})")
        _verified.add(key)


def _hashing_rank() -> bool:
    """torchrun starts one process per GPU on the same files: the first of each machine hashes them, the
    others check sizes only (N processes re-reading a large cache at once would only contend for the disk)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def check_safetensors(path: str | os.PathLike) -> None:
    """PPCLError naming ``path`` unless it is a complete safetensors file (header parses, data size matches)."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PPCLError(f"{p}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise PPCLError(f"{p}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise PPCLError(f"{p}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise PPCLError(f"{p}: not a safetensors file (unreadable header)")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)  # fmt: skip
    if 8 + n + end != size:
        raise PPCLError(f"{p}: truncated or damaged safetensors file ({size} bytes, its header needs {8 + n + end})")


def check_pipeline_weights(model: str | os.PathLike) -> None:
    """:func:`check_safetensors` on every ``*.safetensors`` of a local pipeline folder (no-op otherwise)."""
    root = Path(model)
    if storage.is_s3(str(model)) or not root.is_dir():
        return
    for f in sorted(root.glob("*/*.safetensors")):
        check_safetensors(f)


def teacher_fingerprint(model) -> str | None:
    """sha256 (hex) of the teacher's transformer config and weights (see the module doc); None for anything
    that is not a local pipeline folder (an in-memory pipeline)."""
    if not isinstance(model, (str, os.PathLike)) or storage.is_s3(str(model)):
        return None
    folder = Path(model) / "transformer"
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        if not f.is_file():
            continue
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


def check_run_inputs(run_dir: str | os.PathLike, run: dict, model) -> None:
    """Before export uses a distill RUN: its plugs file matches the sha256 run.json records, and ``model`` is
    the teacher the plugs were trained on (runs written before fingerprints existed are not checked)."""
    run_dir = Path(run_dir)
    plugs = run_dir / "plugs.safetensors"
    recorded = run.get("plugs_sha256")
    if plugs.is_file():
        try:
            check_safetensors(plugs)
        except PPCLError as e:
            raise PPCLError(f"cannot read plugs: {e}") from None
        if recorded is not None and storage.sha256_file(plugs) != recorded:
            raise PPCLError(f"cannot read plugs: {plugs}: sha256 differs from the one run.json records (changed "
                            f"after training, or from another run)")  # fmt: skip
    fp = (run.get("teacher") or {}).get("fingerprint")
    if fp is not None:
        mine = teacher_fingerprint(model)
        if mine is not None and mine != fp:
            raise PPCLError(f"{run_dir / 'run.json'}: the plugs were trained on another teacher (fingerprint "
                            f"{fp[:12]}), not {model} ({mine[:12]}): same architecture, different weights")  # fmt: skip
