"""A minimal safetensors reader/writer for building corrupted checkpoints in tests
(independent of trit's loader, so the tests do not check the loader with itself)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

Tensors = dict[str, tuple[str, list[int], bytes]]


def read(path: Path) -> Tensors:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    return {
        name: (info["dtype"], list(info["shape"]), data[slice(*info["data_offsets"])])
        for name, info in header.items()
    }


def write(path: Path, tensors: Tensors) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, data in tensors.values():
            f.write(data)
