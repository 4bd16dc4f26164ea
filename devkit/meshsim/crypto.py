"""Channel keys, channel hashes and packet encryption as the firmware does them.

- Key expansion: ``Channels::getKey`` (``src/mesh/Channels.cpp``): a 1-byte PSK is
  an index into the well-known default key (``0`` = no crypto), short keys are
  zero-padded to AES-128/AES-256.
- Channel hash (``MeshPacket.channel`` of an encrypted packet):
  ``Channels::generateHash`` = XOR of the name bytes XOR XOR of the key bytes.
- Encryption: ``CryptoEngine::encryptPacket`` (``src/mesh/CryptoEngine.cpp``),
  AES-CTR with the 16-byte nonce ``packet_id (u64 LE) | from (u32 LE) | 0 (u32)``.
"""

from __future__ import annotations

from functools import reduce
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: ``defaultpsk`` (``src/mesh/Channels.h``), the key behind PSK ``AQ==``.
DEFAULT_PSK = bytes.fromhex("d4f1bb3a20290759f0bcffabcf4e6901")


def expand_psk(psk: bytes) -> bytes:
    """Return the AES key (0, 16 or 32 bytes) for a channel PSK of 0-32 bytes."""
    if not psk:
        return b""
    if len(psk) == 1:
        index = psk[0]
        if index == 0:
            return b""
        key = bytearray(DEFAULT_PSK)
        key[-1] = (key[-1] + index - 1) & 0xFF
        return bytes(key)
    if len(psk) < 16:
        return psk.ljust(16, b"\x00")
    if len(psk) == 16:
        return psk
    return psk[:32].ljust(32, b"\x00")


def xor_hash(data: bytes) -> int:
    """``xorHash``: XOR of all bytes (0-255)."""
    return reduce(lambda acc, byte: acc ^ byte, data, 0)


def channel_hash(name: str, key: bytes) -> int:
    """``Channels::generateHash``: 8-bit hash of the channel name and expanded key."""
    return xor_hash(name.encode()) ^ xor_hash(key)


def crypt(key: bytes, packet_id: int, from_node: int, data: bytes) -> bytes:
    """AES-CTR en/decrypt ``data`` (symmetric); an empty key returns ``data``."""
    if not key:
        return data
    nonce = struct.pack("<QII", packet_id & 0xFFFFFFFF, from_node & 0xFFFFFFFF, 0)
    cipher = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return cipher.update(data) + cipher.finalize()
