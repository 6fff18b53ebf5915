"""Shard an image-text source into deterministic Parquet shards plus a versioned manifest.

Output (a local folder or an s3:// prefix)::

    DIR/shard-00000-of-00004.parquet ...   columns: key (str), caption (str), image (binary, the original
                                           encoded bytes), width, height (int32), source (str: origin)
    DIR/manifest.json                      ShardManifest: counts, bytes and sha256 per shard, every rejected
                                           sample with its reason

Design:
- A sample's shard is ``int(sha256(key)[:8]) % N``: independent of source order and of the other samples.
- Streaming in two passes with bounded memory: pass 1 reads the source once, validates each sample and
  appends it to a per-shard spill file on local disk (TMPDIR); pass 2 sorts each shard's (key, offset)
  index (memory: one index entry per sample of ONE shard) and writes the Parquet file row group by row group.
- Byte-identical output for the same input: rows sorted by key, fixed writer options, fixed row-group
  boundaries, no timestamps (the only writer-dependent field is pyarrow's ``created_by`` version string).
- Images are validated (PIL ``verify`` plus a full decode, which also catches truncated JPEGs) and stored as
  the original bytes, never re-encoded. Rejected: undecodable image, empty/missing caption, smaller side
  below ``min_size``, duplicate key (the first in source order is kept), image without metadata row.
- Re-running skips shards whose bytes are unchanged: the new shard's sha256 is compared with the existing
  file's recorded sha256 (manifest, and for S3 the object's sha256 metadata; for local files the file is
  re-hashed) and an identical shard is neither renamed nor re-uploaded.
- Nothing half-written under a final name: a local shard is written to a hidden temporary beside the final
  name and renamed; an S3 shard is uploaded whole (multipart is invisible until complete); the manifest is
  written last, so a reader that finds a manifest finds every shard it lists.
- Generations: a re-shard never writes over a file the current manifest lists. A shard whose bytes changed
  goes under a new name (``shard-00000-of-00004.<sha256[:12]>.parquet`` when the plain name is taken), the
  new manifest is swapped in atomically, and only then are the files the old manifest listed and the new one
  does not removed. A re-shard killed at any point leaves the previous manifest and every shard it lists intact.
- Readers verify: :func:`read_shard_manifest` checks every listed shard's size and sha256 (S3: size and the
  object's sha256 metadata) before a stage uses the data, and names the first file that does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ppcl import storage
from ppcl.data.sources import iter_samples
from ppcl.errors import PPCLError
from ppcl.integrity import read_manifest

MANIFEST = "manifest.json"
#: Rows per Parquet row group (fixed: row-group boundaries are part of the bytes).
ROW_GROUP_ROWS = 512
#: Also close a row group once its images reach this many bytes, so huge images keep memory bounded.
ROW_GROUP_BYTES = 64 * 1024 * 1024


class ShardInfo(BaseModel):
    name: str
    samples: int
    bytes: int
    sha256: str


class RejectedSample(BaseModel):
    key: str
    location: str
    reason: str


class ShardManifest(BaseModel):
    """DIR/manifest.json. ``read == accepted + len(rejected)`` and ``accepted == sum(shard.samples)``."""

    version: Literal[1] = 1
    kind: Literal["ppcl.shards"] = "ppcl.shards"
    source: str
    format: str
    num_shards: int
    caption_column: str | None = None
    image_column: str | None = None
    key_column: str | None = None
    min_size: int = 0
    read: int
    accepted: int
    shards: list[ShardInfo]
    rejected: list[RejectedSample] = Field(default_factory=list)


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.parquet"


def shard_of(key: str, num_shards: int) -> int:
    """The shard a key belongs to: first 8 bytes of sha256(key) as an integer, modulo num_shards."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


def shard_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("image", pa.binary()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("source", pa.string()),
        ]
    )


# Fixed writer options: part of the determinism contract.
_WRITER_OPTIONS = dict(
    version="2.6",
    compression={"key": "zstd", "caption": "zstd", "image": "none", "width": "zstd", "height": "zstd",
                 "source": "zstd"},
    use_dictionary=["source"],
    write_statistics=["key", "width", "height"],
    data_page_version="1.0",
    write_page_index=False,
)  # fmt: skip


def read_shard_manifest(data_dir: str, *, verify: bool = True) -> ShardManifest:
    """Read and validate DIR/manifest.json (local or s3://); with ``verify`` also check that every shard it
    lists is there with the recorded size and sha256 (PPCLError naming the first one that is not)."""
    path = storage.join(data_dir, MANIFEST)
    if not storage.exists(path):
        raise PPCLError(f"{path} not found: is {data_dir} the output of `ppcl shard`?")
    return read_manifest(ShardManifest, path, data_dir, what="shard manifest", remedy="re-run `ppcl shard`",
                         verify=verify)


def inspect_image(data: bytes, min_size: int = 0) -> tuple[int, int]:
    """(width, height) of encoded image bytes; raises ValueError(reason) for a rejected image."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            # verify() does not decode pixel data (a truncated JPEG passes it): decode fully once.
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                width, height = im.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        # Object reprs carry memory addresses: drop them so the manifest stays byte-identical across runs.
        detail = re.sub(r"\s*<[^>]* at 0x[0-9a-fA-F]+>", "", str(e))
        raise ValueError(f"undecodable image ({type(e).__name__}: {detail})") from e
    if min(width, height) < min_size:
        raise ValueError(f"image {width}x{height} is below the minimum size {min_size} px")
    return width, height


# Spill record header: lengths of key, caption, image, source; width; height.
_HEADER = struct.Struct("<IIIIii")


def _spill_write(f, key: bytes, caption: bytes, image: bytes, source: bytes, w: int, h: int) -> None:
    f.write(_HEADER.pack(len(key), len(caption), len(image), len(source), w, h))
    f.write(key)
    f.write(caption)
    f.write(image)
    f.write(source)


def _spill_index(path: Path) -> list[tuple[str, int]]:
    """(key, offset) of every record in a spill file, reading only headers and keys."""
    out = []
    with open(path, "rb") as f:
        offset = 0
        while header := f.read(_HEADER.size):
            lk, lc, li, ls, _, _ = _HEADER.unpack(header)
            key = f.read(lk).decode("utf-8")
            out.append((key, offset))
            offset += _HEADER.size + lk + lc + li + ls
            f.seek(offset)
    return out


def _spill_read(f, offset: int) -> tuple[str, str, bytes, str, int, int]:
    f.seek(offset)
    lk, lc, li, ls, w, h = _HEADER.unpack(f.read(_HEADER.size))
    key = f.read(lk).decode("utf-8")
    caption = f.read(lc).decode("utf-8")
    image = f.read(li)
    source = f.read(ls).decode("utf-8")
    return key, caption, image, source, w, h


def _write_parquet(spill: Path, out: Path, rejected: list[RejectedSample]) -> int:
    """Write one shard from its spill file (rows sorted by key); returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = sorted(_spill_index(spill)) if spill.exists() else []
    schema = shard_schema()
    rows = 0
    cols: dict[str, list] = {n: [] for n in schema.names}
    nbytes = 0

    def flush(writer) -> None:
        nonlocal nbytes
        if cols["key"]:
            writer.write_table(pa.table(cols, schema=schema), row_group_size=len(cols["key"]))
            for v in cols.values():
                v.clear()
            nbytes = 0

    with pq.ParquetWriter(out, schema, **_WRITER_OPTIONS) as writer:
        if index:
            with open(spill, "rb") as f:
                previous = None
                for key, offset in index:
                    _, caption, image, source, w, h = _spill_read(f, offset)
                    if key == previous:  # sorted by (key, offset): the first in source order is kept
                        rejected.append(RejectedSample(key=key, location=source, reason="duplicate key"))
                        continue
                    previous = key
                    for name, value in zip(schema.names, (key, caption, image, w, h, source), strict=True):
                        cols[name].append(value)
                    rows += 1
                    nbytes += len(image)
                    if len(cols["key"]) >= ROW_GROUP_ROWS or nbytes >= ROW_GROUP_BYTES:
                        flush(writer)
        flush(writer)
    return rows


def _existing(out: str, num_shards: int) -> dict[str, str]:
    """{shard name: sha256} of shards already in ``out`` whose recorded checksum is still true."""
    try:
        manifest = read_shard_manifest(out, verify=False)
    except PPCLError:
        return {}
    if manifest.num_shards != num_shards:
        return {}
    ok = {}
    for s in manifest.shards:
        path = storage.join(out, s.name)
        try:
            if storage.is_s3(out):
                meta = storage.head(path)
                actual = meta["metadata"].get("sha256") if meta["size"] == s.bytes else None
            else:
                actual = storage.sha256_file(path) if Path(path).exists() else None
        except PPCLError:
            actual = None
        if actual == s.sha256:
            ok[s.name] = s.sha256
    return ok


def shard_source(
    source: str,
    out: str,
    num_shards: int,
    *,
    fmt: str = "auto",
    caption_column: str | None = None,
    image_column: str | None = None,
    key_column: str | None = None,
    min_size: int = 0,
    progress: bool = True,
) -> tuple[ShardManifest, int]:
    """Shard ``source`` into ``num_shards`` Parquet files under ``out``; returns (manifest, shards written).

    Shards whose bytes equal the existing ones are not rewritten (``written`` counts the others).
    Raises PPCLError for an unreadable source, a missing column, or a source without one valid sample;
    in that case nothing is written under ``out``.
    """
    from ppcl.progress import progress as tqdm

    if num_shards < 1:
        raise PPCLError(f"--shards must be at least 1 (got {num_shards})")
    if min_size < 0:
        raise PPCLError(f"--min-size must be >= 0 (got {min_size})")
    out = str(out).rstrip("/") if storage.is_s3(out) else str(out)
    if not storage.is_s3(out) and Path(out).exists() and not Path(out).is_dir():
        raise PPCLError(f"--out {out} exists and is not a folder")
    from ppcl.data.sources import detect_format, list_source

    storage.check_bucket(out)  # a wrong bucket or credentials must fail before an hour of reading

    fmt_used = detect_format(list_source(source)) if fmt == "auto" else fmt
    fresh: list[str] = []  # files this run added: removed again if it fails, so the old generation stays
    created = False
    spill_dir = Path(tempfile.mkdtemp(prefix="ppcl-shard-"))
    try:
        # Pass 1: read, validate, route each sample to its shard's spill file.
        spills = [spill_dir / f"{i:05d}.bin" for i in range(num_shards)]
        read, rejected = _spill_samples(source, fmt_used, spills, caption_column=caption_column,
                                        image_column=image_column, key_column=key_column, min_size=min_size,
                                        progress=progress)

        # Pass 2: one shard at a time, sorted by key; skip shards whose bytes did not change.
        existing = _existing(out, num_shards)
        previous = _listed(out)  # the current generation: removed only once the new manifest is in place
        local_out = None if storage.is_s3(out) else Path(out)
        created = local_out is not None and not local_out.exists()
        if local_out is not None:
            local_out.mkdir(parents=True, exist_ok=True)
        shards, written = [], 0
        for i in tqdm(range(num_shards), desc="shard: write", unit="shard", disable=not progress):
            name = shard_name(i, num_shards)
            tmp_dir = local_out if local_out is not None else spill_dir
            tmp = tmp_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                rows = _write_parquet(spills[i], tmp, rejected)
                spills[i].unlink(missing_ok=True)
                digest = storage.sha256_file(tmp)
                nbytes = tmp.stat().st_size
                same = [n for n, d in existing.items() if d == digest and n.startswith(name.removesuffix(".parquet"))]
                if same:  # unchanged, possibly under a generation name
                    name = same[0]
                if existing.get(name) != digest:
                    if name in existing:  # an intact file of the current generation is never written over
                        name = generation_name(i, num_shards, digest)
                    if name not in previous:
                        fresh.append(name)
                    if local_out is not None:
                        os.replace(tmp, local_out / name)
                    else:
                        storage.upload_file(tmp, storage.join(out, name), sha256=digest)
                    written += 1
            finally:
                tmp.unlink(missing_ok=True)
            shards.append(ShardInfo(name=name, samples=rows, bytes=nbytes, sha256=digest))
    except BaseException:
        for name in fresh:
            storage.remove(storage.join(out, name))
        if created and next(local_out.iterdir(), None) is None:
            local_out.rmdir()
        raise
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    manifest = ShardManifest(
        source=_redact(source), format=fmt_used, num_shards=num_shards, caption_column=caption_column,
        image_column=image_column, key_column=key_column, min_size=min_size, read=read,
        accepted=sum(s.samples for s in shards), shards=shards, rejected=rejected,
    )  # fmt: skip
    storage.write_bytes(storage.join(out, MANIFEST), (manifest.model_dump_json(indent=2) + "\n").encode())
    # The new generation is in place: drop what only the old one listed (and temporaries of killed runs).
    keep = {s.name for s in shards}
    for name in sorted(previous - keep):
        storage.remove(storage.join(out, name))
    if local_out is not None:
        for p in local_out.iterdir():
            if p.name not in keep and _SHARD_FILE.fullmatch(p.name):
                p.unlink(missing_ok=True)
    return manifest, written


def _spill_samples(source: str, fmt: str, spills: list[Path], *, caption_column: str | None,
                   image_column: str | None, key_column: str | None, min_size: int, progress: bool
                   ) -> tuple[int, list[RejectedSample]]:
    """Pass 1 of :func:`shard_source`: read every sample of ``source``, validate it, append the valid ones to the
    spill file of their shard (``spills[shard_of(key)]``). Returns (samples read, rejected samples); raises
    PPCLError when the source has no sample or no valid one."""
    from ppcl.progress import progress as tqdm

    rejected: list[RejectedSample] = []
    read = 0
    handles: dict[int, object] = {}
    try:
        samples = iter_samples(source, fmt=fmt, caption_column=caption_column, image_column=image_column,
                               key_column=key_column)
        for s in tqdm(samples, desc="shard: read", unit="sample", disable=not progress):
            read += 1
            problem = s.problem
            if problem is None:
                try:
                    w, h = inspect_image(s.image, min_size)
                except ValueError as e:
                    problem = str(e)
            if problem is not None:
                rejected.append(RejectedSample(key=s.key, location=s.location, reason=problem))
                continue
            i = shard_of(s.key, len(spills))
            if i not in handles:
                handles[i] = open(spills[i], "ab", buffering=1024 * 1024)
            _spill_write(handles[i], s.key.encode(), s.caption.encode(), s.image, s.location.encode(), w, h)
    finally:
        for f in handles.values():
            f.close()
    if read == 0:
        raise PPCLError(f"source {source} contains no samples")
    if read == len(rejected):
        first = rejected[0]
        raise PPCLError(f"source {source} has no valid sample: all {read} rejected "
                        f"(first: '{first.key}' at {first.location}: {first.reason})")
    return read, rejected


#: Files shard owns in its output folder: shards of any generation and temporaries of killed runs.
_SHARD_FILE = re.compile(r"\.?shard-\d{5}-of-\d{5}(\.[0-9a-f]{12})?\.parquet(\.tmp-[0-9a-f]{8})?")


def generation_name(index: int, num_shards: int, digest: str) -> str:
    """The name of a changed shard whose plain name the current manifest still lists."""
    return f"shard-{index:05d}-of-{num_shards:05d}.{digest[:12]}.parquet"


def _listed(out: str) -> set[str]:
    try:
        return {s.name for s in read_shard_manifest(out, verify=False).shards}
    except PPCLError:
        return set()


def _redact(uri: str) -> str:
    # s3 URIs never hold credentials, but a user might paste user:password@ into an http-like source.
    return uri.split("@", 1)[-1] if "://" in uri and "@" in uri.split("/", 3)[2] else uri


def iter_shard_rows(
    data_dir: str, columns: list[str] | None = None, batch_size: int = 64
) -> Iterator[tuple[str, dict[str, list]]]:
    """Yield (shard name, column batch as {column: list}) over every shard listed in the manifest."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    manifest = read_shard_manifest(data_dir)
    for s in manifest.shards:
        path = storage.join(data_dir, s.name)
        with storage.open_read(path) as fh:
            try:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns):
                    yield s.name, batch.to_pydict()
            except (pa.ArrowException, OSError) as e:
                raise PPCLError(f"{path}: unreadable shard ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def manifest_summary(manifest: ShardManifest) -> str:
    return json.dumps(
        {"read": manifest.read, "accepted": manifest.accepted, "rejected": len(manifest.rejected),
         "shards": manifest.num_shards},
    )  # fmt: skip
