"""A minimal PNG encoder for the synthetic dataset's 8-bit grayscale stains (pure Python + zlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 [H, W] array as an 8-bit grayscale PNG.

    A minimal encoder (no row filters, zlib level 1, run-length strategy): about three times faster than
    Pillow's on these images and decoded by every PNG reader.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got shape {image.shape}")
    h, w = image.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)  # filter byte 0 (None) per row
    raw[:, 1:] = image
    comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = comp.compress(raw.tobytes()) + comp.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
