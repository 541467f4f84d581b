"""The on-disk form of a SimilarityIndex: one file, written atomically, with a SHA-256 checksum.

Layout: ``MAGIC`` (8 bytes) | header length (uint64, little-endian) | header (UTF-8 JSON:
``{"meta": {...}, "sha256": hex}``) | sections (raw bytes, lengths in ``meta["sections"]``).
The checksum covers the canonical JSON of ``meta`` and every section, so a flipped byte anywhere
after the header length, or a truncated file, fails the load with a ValueError instead of
producing a silently different index.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..atomic_io import atomic_path

MAGIC = b"UFSIMIX1"
FORMAT_VERSION = 1


def _digest(meta: dict[str, Any], sections: list[memoryview]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for section in sections:
        digest.update(section)
    return digest.hexdigest()


def _write_section(fh: BinaryIO, section: memoryview) -> None:
    fh.write(section)


def write(path: str | os.PathLike[str], meta: dict[str, Any], sections: list[np.ndarray]) -> None:
    """Write ``meta`` and the byte ``sections`` (C-contiguous arrays) to ``path`` atomically."""
    views = [memoryview(np.ascontiguousarray(s)).cast("B") for s in sections]
    meta = dict(meta, format_version=FORMAT_VERSION, sections=[v.nbytes for v in views])
    header = json.dumps({"meta": meta, "sha256": _digest(meta, views)}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for view in views:
            _write_section(fh, view)


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(meta, sections as uint8 arrays) of a file written by :func:`write`; ValueError if it is corrupt."""
    data = Path(path).read_bytes()
    prefix = len(MAGIC) + 8
    if len(data) < prefix or data[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a SimilarityIndex file (its first bytes are not {MAGIC!r})")
    (header_len,) = struct.unpack("<Q", data[len(MAGIC):prefix])
    try:
        header = json.loads(data[prefix:prefix + header_len].decode())
        meta, expected = header["meta"], header["sha256"]
        sizes = [int(n) for n in meta["sections"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is corrupt: its header does not parse") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    start = prefix + header_len
    if len(data) != start + sum(sizes):
        raise ValueError(f"{path} is corrupt or truncated: {len(data)} bytes, the header announces {start + sum(sizes)}")
    bounds = np.cumsum([start] + sizes).tolist()
    views = [memoryview(data)[a:b] for a, b in itertools.pairwise(bounds)]
    if _digest(meta, views) != expected:
        raise ValueError(f"{path} is corrupt: its SHA-256 checksum does not match the content")
    return meta, [np.frombuffer(v, dtype=np.uint8) for v in views]
