"""Read the records of a W&B offline run file (``run-<id>.wandb``) with wandb's own protobuf classes.

The file is a LevelDB-style log (W&B's ``:W&B`` header, 32 KiB blocks of checksummed chunks); wandb 0.31 ships no
Python reader, so the framing is read here and each record parsed with ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _LAST = 1, 2, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, out, buf = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER]) if left >= _HEADER else (0, 0, 0)
        if left < _HEADER or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def history(path: str | Path) -> list[dict]:
    """The logged rows (``run.log``) of a run file, values as floats (W&B's own keys, ``_step`` ..., dropped)."""
    import json

    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
                         if not (i.key or "/".join(i.nested_key)).startswith("_")})
    return rows


def run_info(path: str | Path) -> tuple[str, str, str]:
    """(run id, display name, project) of a run file."""
    rec = next(r for r in records(path) if r.WhichOneof("record_type") == "run")
    return rec.run.run_id, rec.run.display_name, rec.run.project
