"""Read what W&B wrote offline (`run-*.wandb`), so tests check the logged values themselves.

The file is W&B's LevelDB-style record log: a 7-byte header (":W&B", magic, version), then 32 KiB
blocks (counted from the start of the file) of records, each with a 7-byte header (crc32 of the type
and data, length, type: full/first/middle/last) and a serialised `wandb_internal_pb2.Record` or a
fragment of one. A block's last bytes are zero padding when fewer than 7 are left.

W&B's service writes the log a block at a time and the last block when it closes the run, after
`run.finish()` returns: until then the file may hold only its header. `Tracker.finish` waits for it
(`wandb.teardown()`); a log without the run's exit record is read as an error here, not as a run that
logged nothing.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        assert len(chunk) == length, f"{path}: record at byte {pos} cut short ({len(chunk)} of {length} bytes)"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _log(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    (log_file,) = run_dir.glob("run-*.wandb")
    out = records(log_file)
    assert any(r.WhichOneof("record_type") == "exit" for r in out), (
        f"{log_file} has no exit record ({len(out)} records, {log_file.stat().st_size} bytes): W&B has not "
        "finished writing it. It writes the last block when the run's stream closes, after run.finish() returns; "
        "wandb.teardown() waits for that."
    )
    return out


def history(run_dir: Path) -> list[dict]:
    """Every `wandb.log` call of an offline run, as {key: value} dicts."""
    rows = []
    for record in _log(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def offline_run(output_dir: Path) -> Path:
    """The one offline run a stage wrote under its output_dir."""
    (found,) = (output_dir / "wandb").glob("offline-run-*")
    return found


def run_info(run_dir: Path) -> wandb_internal_pb2.RunRecord:
    """What `wandb.init` recorded: run_id, run_group, job_type, display_name, ..."""
    (run,) = [r.run for r in _log(run_dir) if r.WhichOneof("record_type") == "run"]
    return run


def config(run_dir: Path) -> dict:
    """The run's config: the values given to `wandb.init`, then every `run.config.update`."""
    out = {}
    for record in _log(run_dir):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            out.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return out


def summary(run_dir: Path) -> dict:
    """The run's summary as it stood at the end: every update applied in order."""
    out = {}
    for record in _log(run_dir):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def artifacts(run_dir: Path, kind: str) -> list[wandb_internal_pb2.ArtifactRecord]:
    """The artifacts of one type (`manifest`, `run_table`, ...) the run logged."""
    return [r.artifact for r in _log(run_dir) if r.WhichOneof("record_type") == "artifact" and r.artifact.type == kind]


def table_rows(run_dir: Path, key: str) -> list[tuple[int, list[dict]]]:
    """Each `wandb.Table` logged under `key` as (step, rows), read back from the table file W&B saved."""
    tables = []
    for row in history(run_dir):
        if row.get(f"{key}/_type") == "table-file":
            saved = json.loads((run_dir / "files" / row[f"{key}/path"]).read_text())
            tables.append((row["_step"], [dict(zip(saved["columns"], r, strict=True)) for r in saved["data"]]))
    return tables
