"""TensorBoard scalar event files written without TensorFlow.

An event file is a TFRecord stream of `Event` protocol buffers; the few fields scalars need
are encoded here by hand, so TensorBoard reads the files while igpt depends on neither
TensorFlow nor tensorboard.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated and offset so CRCs of CRCs stay distinct."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
    event = b"\x09" + struct.pack("<d", time.time())  # field 1: wall_time (double)
    event += b"\x10" + _varint(step)  # field 2: step (int64)
    if file_version:
        event += _length_delimited(3, file_version.encode())
    if summary:
        event += _length_delimited(5, summary)
    return event


def _scalar_value(tag: str, value: float) -> bytes:
    # Summary.Value: field 1 tag (string), field 2 simple_value (float).
    return _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value)


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(logdir / name, "ab")  # noqa: SIM115 - closed in close()
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + struct.pack("<I", _masked_crc32c(length)))
        self._file.write(record + struct.pack("<I", _masked_crc32c(record)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record `values` (tag -> number) at `step`."""
        summary = b"".join(
            _length_delimited(1, _scalar_value(k, float(v))) for k, v in values.items()
        )
        self._write(_event(step, summary=summary))
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()
