"""Streaming readers for raw image-text sources: image folder + metadata.jsonl, Parquet, WebDataset tars.

Each reader yields :class:`RawSample` one at a time (bounded memory) from a local folder/file or an s3:// prefix.
A sample that cannot be used carries a ``problem`` (the sharder records it as rejected with that reason);
a source that cannot be read at all (a missing caption column, a corrupt tar, bad JSON) raises
:class:`ppcl.errors.PPCLError` naming the file and line/member.

Keys (design choice, they decide the shard of each sample and must be stable across runs):
- imagefolder: the image's path relative to the source root, e.g. ``train/0001.png``;
- parquet: the ``--key-column`` value if given (or a ``key`` column if present), else ``<file>#<row>``
  with ``<file>`` relative to the source root;
- webdataset: ``<tar name without .tar>/<sample key>`` (the WebDataset key is the member path up to the
  first dot of its base name), so equal keys in different tars do not collide.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from ppcl import storage
from ppcl.errors import PPCLError

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"}
#: Caption columns tried, in order, when none is given.
CAPTION_CANDIDATES = ("caption", "text", "prompt")
FORMATS = ("imagefolder", "parquet", "webdataset")


@dataclass
class RawSample:
    key: str
    caption: str | None
    image: bytes | None
    location: str  # origin relative to the source root: file, file.jsonl:line, file#row or file.tar#key
    problem: str | None = None


def _rel(path: str, root: str) -> str:
    root = root.rstrip("/")
    if path == root:
        return posixpath.basename(path)
    return path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(name) else ""


def _root(source: str) -> str:
    return str(source).rstrip("/") if storage.is_s3(source) else str(source).rstrip("/").replace("\\", "/")


def list_source(source: str) -> list[str]:
    """Sorted files of a source (a folder/prefix or one file); an empty source is an error."""
    files = [f.replace("\\", "/") for f in storage.list_files(source)]
    if not files:
        raise PPCLError(f"source {source} is empty: no files found")
    return files


def detect_format(files: list[str]) -> str:
    """imagefolder if any metadata.jsonl, else parquet if any .parquet, else webdataset if any .tar."""
    names = [posixpath.basename(f) for f in files]
    if "metadata.jsonl" in names:
        return "imagefolder"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(n.endswith((".tar", ".tar.gz", ".tgz")) for n in names):
        return "webdataset"
    raise PPCLError(
        "cannot tell the source format: no metadata.jsonl (imagefolder), .parquet or .tar files found "
        f"(first file: {files[0]})"
    )


def iter_samples(
    source: str,
    *,
    fmt: str = "auto",
    caption_column: str | None = None,
    image_column: str | None = None,
    key_column: str | None = None,
) -> Iterator[RawSample]:
    """Yield every sample of ``source`` in a deterministic order (sorted files, file order within)."""
    files = list_source(source)
    fmt = detect_format(files) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise PPCLError(f"unknown source format {fmt!r} (choose from {', '.join(FORMATS)})")
    root = _root(source)
    if len(files) == 1 and files[0].rstrip("/") == root:  # a single file given: keys relative to its folder
        root = posixpath.dirname(root)
    if fmt == "imagefolder":
        yield from _imagefolder(files, root, caption_column)
    elif fmt == "parquet":
        yield from _parquet(files, root, caption_column, image_column or "image", key_column)
    else:
        yield from _webdataset(files, root, caption_column)


def _pick_caption(columns, wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise PPCLError(f"{where} has no caption column '{wanted}' (columns: {', '.join(map(str, columns))})")
        return wanted
    for c in CAPTION_CANDIDATES:
        if c in columns:
            return c
    raise PPCLError(
        f"{where} has no caption column (looked for {', '.join(CAPTION_CANDIDATES)}; "
        f"columns: {', '.join(map(str, columns))}; set --caption-column)"
    )


def _caption(value) -> tuple[str | None, str | None]:
    """(caption, problem) from a raw column value."""
    if value is None:
        return None, "missing caption"
    if not isinstance(value, str):
        return None, f"caption is not a string ({type(value).__name__})"
    if not value.strip():
        return None, "empty caption"
    return value, None


# ------------------------------------------------------------------------------------------ imagefolder
def _imagefolder(files: list[str], root: str, caption_column: str | None) -> Iterator[RawSample]:
    """Hugging Face imagefolder: metadata.jsonl rows ``{"file_name": ..., "<caption>": ...}``; file names are
    relative to the folder holding that metadata.jsonl. Image files no row mentions are rejected, not
    silently skipped."""
    images = {f for f in files if _ext(f) in IMAGE_EXTS}
    for meta in (f for f in files if posixpath.basename(f) == "metadata.jsonl"):
        base = posixpath.dirname(meta)
        column = caption_column
        with storage.open_read(meta) as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                where = f"{meta}:{lineno}"
                try:
                    row = json.loads(raw)
                except ValueError as e:
                    raise PPCLError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(row, dict) or "file_name" not in row:
                    raise PPCLError(f"{where}: row has no 'file_name' field")
                if column is None or lineno == 1:
                    # The first row fixes (and checks) the caption column of this file.
                    column = _pick_caption(list(row), caption_column, where)
                path = posixpath.normpath(posixpath.join(base, str(row["file_name"])))
                if storage.is_s3(meta):
                    path = "s3://" + posixpath.normpath(posixpath.join(base[5:], str(row["file_name"])))
                key = _rel(path, root)
                caption, problem = _caption(row.get(column))
                if path not in images:
                    yield RawSample(
                        key, caption, None, f"{_rel(meta, root)}:{lineno}", f"image file {row['file_name']} not found"
                    )
                    continue
                images.discard(path)
                yield RawSample(key, caption, storage.read_bytes(path), key, problem)
    for path in sorted(images):
        yield RawSample(_rel(path, root), None, None, _rel(path, root), "image has no row in any metadata.jsonl")


# ---------------------------------------------------------------------------------------------- parquet
def _parquet(
    files: list[str], root: str, caption_column: str | None, image_column: str, key_column: str | None
) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    parquets = [f for f in files if f.endswith(".parquet")]
    if not parquets:
        raise PPCLError(f"source {root} has no .parquet files")
    for path in parquets:
        with storage.open_read(path) as fh:
            try:
                pf = pq.ParquetFile(fh)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise PPCLError(f"{path}: not a readable Parquet file ({e})") from e
            names = pf.schema_arrow.names
            caption = _pick_caption(names, caption_column, path)
            if image_column not in names:
                raise PPCLError(f"{path} has no image column '{image_column}' (columns: {', '.join(names)}; "
                                "set --image-column)")  # fmt: skip
            kcol = key_column if key_column is not None else ("key" if "key" in names else None)
            if kcol is not None and kcol not in names:
                raise PPCLError(f"{path} has no key column '{kcol}' (columns: {', '.join(names)})")
            columns = list(dict.fromkeys([c for c in (caption, image_column, kcol) if c]))
            rel = _rel(path, root)
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    key = str(data[kcol][i]) if kcol else f"{rel}#{row}"
                    image = data[image_column][i]
                    if isinstance(image, dict):  # Hugging Face Image feature: struct{bytes, path}
                        image = image.get("bytes")
                    text, problem = _caption(data[caption][i])
                    if not isinstance(image, bytes | bytearray) or not image:
                        problem = problem or "no image bytes"
                        image = None
                    yield RawSample(key, text, bytes(image) if image else None, f"{rel}#{row}", problem)
                    row += 1


# ------------------------------------------------------------------------------------------- webdataset
def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the base name; ext = the rest."""
    d, b = posixpath.split(name)
    stem, _, ext = b.partition(".")
    return posixpath.join(d, stem), ext.lower()


def _webdataset(files: list[str], root: str, caption_column: str | None) -> Iterator[RawSample]:
    tars = [f for f in files if f.endswith((".tar", ".tar.gz", ".tgz"))]
    if not tars:
        raise PPCLError(f"source {root} has no .tar files")
    for path in tars:
        prefix = rel = _rel(path, root)
        for suffix in (".tar.gz", ".tgz", ".tar"):
            if prefix.endswith(suffix):
                prefix = prefix[: -len(suffix)]
                break
        current, members, last = None, {}, None
        with storage.open_read(path) as fh:
            try:
                tar = tarfile.open(fileobj=fh, mode="r|*")
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _wds_key(member.name)
                    if current is not None and key != current:
                        yield _wds_sample(f"{prefix}/{current}", members, f"{rel}#{current}", caption_column)
                        members = {}
                    current = key
                    members[ext] = tar.extractfile(member).read()
                    last = member.name
                tar.close()
            except (tarfile.TarError, EOFError, OSError, ValueError) as e:
                after = f" after member '{last}'" if last else " at its first member"
                raise PPCLError(f"{path}: unreadable tar member{after} ({type(e).__name__}: {e})") from e
        if current is not None:
            yield _wds_sample(f"{prefix}/{current}", members, f"{rel}#{current}", caption_column)


def _wds_sample(key: str, members: dict[str, bytes], where: str, caption_column: str | None) -> RawSample:
    image = next((members[e] for e in sorted(members) if e in IMAGE_EXTS), None)
    caption, problem = None, None
    text_exts = [caption_column] if caption_column else ["txt", "caption", "text"]
    found = [e for e in text_exts if e in members]
    if found:
        try:
            caption, problem = _caption(members[found[0]].decode("utf-8"))
        except UnicodeDecodeError:
            problem = f"caption member .{found[0]} is not UTF-8"
    elif "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            problem = "json member is not a JSON object"
        else:
            names = [caption_column] if caption_column else list(CAPTION_CANDIDATES)
            field = next((n for n in names if n in meta), None)
            caption, problem = _caption(meta.get(field)) if field else (None, "missing caption")
    else:
        problem = "missing caption (no .txt or .json member)"
    if image is None:
        problem = problem or f"no image member (members: {', '.join(sorted(members))})"
    return RawSample(key, caption, image, where, problem)
