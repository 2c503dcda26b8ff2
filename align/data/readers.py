"""Read a source's raw rows, each with where it came from (file and line or row) for error messages.

Local jsonl is parsed line by line so a bad line is reported by number and does not hide the
rest; json, parquet and csv are read whole. Anything else that is not a local path is a hub id
and goes through ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.data.formats import RowError
from align.data.recipe import SourceSpec, display_path
from align.errors import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub(spec: SourceSpec) -> bool:
    local = spec.recipe.parent / spec.path
    return (
        not glob.has_magic(spec.path)
        and not local.exists()
        and not spec.path.startswith((".", "/", "~"))
        and Path(spec.path).suffix not in EXTENSIONS
        and bool(HUB_ID.match(spec.path))
    )


def source_files(spec: SourceSpec) -> list[Path]:
    """The local files of a source: one file, every data file in a folder, or a glob's matches."""
    base = spec.recipe.parent
    pattern = Path(spec.path).expanduser()
    pattern = pattern if pattern.is_absolute() else base / pattern
    where = f"{display_path(spec.recipe)}: source {spec.path!r}"
    if glob.has_magic(spec.path):
        files = [Path(p) for p in sorted(glob.glob(str(pattern), recursive=True)) if Path(p).is_file()]
    elif pattern.is_dir():
        files = sorted(p for p in pattern.iterdir() if p.suffix in EXTENSIONS)
    elif pattern.is_file():
        files = [pattern]
    else:
        raise DataError(f"{where}: file not found ({display_path(pattern)})")
    if not files:
        raise DataError(f"{where}: no {'/'.join(EXTENSIONS)} files found")
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{where}: cannot read {f.name!r} (supported: {', '.join(EXTENSIONS)})")
    return files


def read_rows(spec: SourceSpec) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """Yield ``(where, row)``, or ``(where, RowError)`` for a row that is not even a JSON object."""
    if is_hub(spec):
        yield from _read_hub(spec)
        return
    files = source_files(spec)
    for path in files:
        prefix = f"file {path.name!r} " if len(files) > 1 else ""
        for where, row in _read_file(path):
            if not isinstance(row, dict | RowError):
                row = RowError("", "wrong_type", f"expected an object, got {type(row).__name__}")
            yield prefix + where, row


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # Many ".json" files on the hub are JSON lines; datasets reads them either way.
            yield from _read_jsonl(path)
            return
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}, a common wrapper
        if not isinstance(data, list):
            raise DataError(f"{display_path(path)}: expected a JSON list of rows, got {type(data).__name__}")
        for i, row in enumerate(data):
            yield f"row {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i}", row
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"line {reader.line_num}", row


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) are not rows
            try:
                yield f"line {number}", json.loads(line.rstrip())
            except json.JSONDecodeError as e:
                yield f"line {number}", RowError("", "bad_json", f"bad JSON ({e.msg} at column {e.colno})")


def _read_hub(spec: SourceSpec) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(
            spec.path, name=spec.name, data_dir=spec.data_dir, revision=spec.revision, split=spec.split
        )
    except Exception as e:  # the hub's errors are many and long; the first line says enough
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{display_path(spec.recipe)}: source {spec.path!r}: cannot load from the hub ({first})"
        ) from None
    for i, row in enumerate(dataset):
        yield f"row {i}", row


def source_stamp(spec: SourceSpec) -> list[Any]:
    """What identifies a source's content for the cache: files' size and mtime, or the hub id."""
    if is_hub(spec):
        return [spec.path, spec.name, spec.data_dir, spec.split, spec.revision]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in source_files(spec)]
