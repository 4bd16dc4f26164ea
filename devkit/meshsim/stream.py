"""Stream API framing (TCP 4403 / serial), the device side.

Frame: ``0x94 0xC3 LEN_MSB LEN_LSB`` + ``LEN`` bytes of protobuf, ``LEN <= 512``
(``MAX_TO_FROM_RADIO_SIZE``).  :class:`FrameParser` reproduces the receive state
machine of ``StreamAPI::readStream`` (``src/mesh/StreamAPI.cpp``) byte for byte,
including its quirks:

- any byte other than ``0x94`` while hunting is discarded (wake bytes, log text);
- when the byte after ``0x94`` is not ``0xC3`` the parser resets *without*
  re-examining that byte, so ``... 0x94`` + a valid frame loses that frame;
- a header announcing more than 512 bytes resets the hunt right after the
  header; the announced payload bytes are then hunted through like garbage;
- a zero-length frame is delivered (an empty ``ToRadio``: a keepalive).
"""

from __future__ import annotations

from dataclasses import dataclass

START1 = 0x94
START2 = 0xC3
HEADER_LEN = 4
MAX_TO_FROM_RADIO_SIZE = 512


def encode_frame(payload: bytes) -> bytes:
    """Frame ``payload`` (at most 512 bytes) as ``StreamAPI::emitTxBuffer`` does."""
    if len(payload) > MAX_TO_FROM_RADIO_SIZE:
        raise ValueError(f"frame payload too large: {len(payload)} > 512")
    return bytes((START1, START2, len(payload) >> 8, len(payload) & 0xFF)) + payload


@dataclass(frozen=True)
class Frame:
    """A complete frame's payload (``bytes``, 0-512 long)."""

    payload: bytes


@dataclass(frozen=True)
class RejectedHeader:
    """A header whose length (``length``, > 512) made the parser restart."""

    length: int


class FrameParser:
    """Incremental ``StreamAPI`` receive state machine (one per connection)."""

    def __init__(self) -> None:
        self._ptr = 0  # rxPtr: bytes of the current frame seen so far
        self._header = bytearray(HEADER_LEN)
        self._payload = bytearray()
        self._length = 0

    def feed(self, data: bytes) -> list[Frame | RejectedHeader]:
        """Consume ``data``; return completed frames and rejected headers in order."""
        out: list[Frame | RejectedHeader] = []
        i = 0
        n = len(data)
        while i < n:
            ptr = self._ptr
            if ptr == 0:
                j = data.find(START1, i)
                if j < 0:
                    return out
                self._header[0] = START1
                self._ptr = 1
                i = j + 1
            elif ptr == 1:
                c = data[i]
                i += 1
                # Quirk: a non-START2 byte is consumed, not re-examined as START1.
                if c == START2:
                    self._header[1] = c
                    self._ptr = 2
                else:
                    self._ptr = 0
            elif ptr == 2:
                self._header[2] = data[i]
                i += 1
                self._ptr = 3
            elif ptr == 3:
                self._header[3] = data[i]
                i += 1
                self._length = (self._header[2] << 8) | self._header[3]
                if self._length > MAX_TO_FROM_RADIO_SIZE:
                    self._ptr = 0
                    out.append(RejectedHeader(self._length))
                elif self._length == 0:
                    self._ptr = 0
                    out.append(Frame(b""))
                else:
                    self._ptr = HEADER_LEN
                    self._payload.clear()
            else:
                need = self._length - len(self._payload)
                chunk = data[i : i + need]
                self._payload += chunk
                i += len(chunk)
                if len(self._payload) == self._length:
                    self._ptr = 0
                    out.append(Frame(bytes(self._payload)))
        return out
