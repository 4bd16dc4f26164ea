"""Meshtastic stream API framing (TCP port 4403 and serial).

A frame is ``0x94 0xC3 LEN_MSB LEN_LSB`` followed by ``LEN`` bytes of protobuf
(``ToRadio`` towards the node, ``FromRadio`` from it). ``LEN`` is at most
``MAX_FRAME_PAYLOAD`` (512, firmware ``MAX_TO_FROM_RADIO_SIZE``); receivers hunt
for the two start bytes and resynchronise on anything else.

Sources: firmware ``src/mesh/StreamAPI.h/.cpp``; meshtastic Python library
``stream_interface.py`` (``START1``, ``START2``, ``HEADER_LEN``,
``MAX_TO_FROM_RADIO_SIZE``). A zero-length frame is a valid keepalive.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

START1 = 0x94
START2 = 0xC3
HEADER_LEN = 4
MAX_FRAME_PAYLOAD = 512
_MAGIC = bytes((START1, START2))
# Bytes the library sends before the first request, to wake a sleeping serial
# console and flush a half-received frame (``stream_interface.py``).
WAKE_BYTES = bytes([START2]) * 32


class FrameTooLargeError(ValueError):
    """Raised by :func:`encode_frame` when a payload exceeds 512 bytes."""


def encode_frame(payload: bytes) -> bytes:
    """Return ``payload`` wrapped in a stream API frame header.

    Raises:
        FrameTooLargeError: ``len(payload)`` is above ``MAX_FRAME_PAYLOAD``.

    """
    size = len(payload)
    if size > MAX_FRAME_PAYLOAD:
        raise FrameTooLargeError(
            f"frame payload is {size} bytes, the stream API allows {MAX_FRAME_PAYLOAD}"
        )
    return bytes((START1, START2, size >> 8, size & 0xFF)) + payload


@dataclass(slots=True)
class DecoderStats:
    """Counters of what :class:`FrameDecoder` could not use.

    ``garbage_bytes`` counts bytes outside any frame (on serial these are the
    node's debug log text); ``oversize_frames`` counts headers announcing more
    than 512 bytes, which are skipped by resynchronising on the next start byte.
    """

    frames: int = 0
    garbage_bytes: int = 0
    oversize_frames: int = 0


class FrameDecoder:
    """Incremental stream API frame decoder.

    Feed it whatever the transport delivered; it returns every complete frame
    payload (``bytes``, possibly empty for a keepalive frame) in order and keeps
    any partial frame for the next call. Never raises on malformed input.
    """

    def __init__(self, on_garbage: Callable[[bytes], None] | None = None) -> None:
        """Create a decoder; ``on_garbage`` receives bytes found outside frames."""
        self._buf = bytearray()
        self._on_garbage = on_garbage
        self.stats = DecoderStats()

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop any partial frame (after a reconnect)."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return the payloads of all frames now complete."""
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while True:
            start = buf.find(_MAGIC, pos)
            if start < 0:
                # Keep a trailing START1: it may begin the next frame.
                keep_from = end - 1 if end > pos and buf[end - 1] == START1 else end
                self._garbage(buf, pos, keep_from)
                pos = keep_from
                break
            self._garbage(buf, pos, start)
            if end - start < HEADER_LEN:
                pos = start
                break
            size = (buf[start + 2] << 8) | buf[start + 3]
            if size > MAX_FRAME_PAYLOAD:
                self.stats.oversize_frames += 1
                # Resynchronise: the start bytes may have been payload or noise.
                self._garbage(buf, start, start + 1)
                pos = start + 1
                continue
            frame_end = start + HEADER_LEN + size
            if frame_end > end:
                pos = start
                break
            frames.append(bytes(buf[start + HEADER_LEN : frame_end]))
            pos = frame_end
        if pos:
            del buf[:pos]
        self.stats.frames += len(frames)
        return frames

    def _garbage(self, buf: bytearray, start: int, stop: int) -> None:
        if stop <= start:
            return
        self.stats.garbage_bytes += stop - start
        if self._on_garbage is not None:
            self._on_garbage(bytes(buf[start:stop]))
