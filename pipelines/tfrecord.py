"""TFRecord framing, written by hand onto any file object (so it goes through Beam's FileSystems).

A TFRecord file is a sequence of records, each framed as

    uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)

(little endian; the mask is TensorFlow's: rotate right by 15 bits, add 0xa282ead8). tf.data's
TFRecordDataset is the reference reader in the tests. The checksum comes from `google_crc32c` (C extension,
installed with apache-beam[gcp]).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import google_crc32c

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC-32C of `data`."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def frame(record: bytes) -> bytes:
    """The bytes of one framed record."""
    length = struct.pack("<Q", len(record))
    return b"".join(
        (length, struct.pack("<I", masked_crc32c(length)), record, struct.pack("<I", masked_crc32c(record)))
    )


def write_record(out: BinaryIO, record: bytes) -> int:
    """Appends one framed record to an open binary file; returns the bytes written."""
    data = frame(record)
    out.write(data)
    return len(data)
