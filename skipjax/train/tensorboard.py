"""TensorBoard event files written directly (no TensorFlow, no torch, no tensorboard package).

An event file is a sequence of TFRecords (TFRecord format: uint64 length, uint32 masked
CRC-32C of the length, the data, uint32 masked CRC-32C of the data; all little-endian) whose
data are serialized `tensorflow.Event` protos: wall_time (field 1, double), step (2, int64),
file_version (3, string, first record) and summary (5) = repeated Summary.Value (1) with tag (1,
string) and simple_value (2, float). Only scalars are written, so the protos are encoded here by
hand (protobuf wire format: varint keys `field << 3 | wire_type`).
"""
import os
import socket
import struct
import time
from typing import Iterator, Tuple

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ _CRC32C_POLY if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's CRC mask: rotate right by 15 and add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 as two's complement
  out = bytearray()
  while True:
    bits = n & 0x7F
    n >>= 7
    if n:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str = "", scalars=()) -> bytes:
  """A serialized Event with `scalars` = [(tag, value), ...] as one Summary."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(int(step))
  if file_version:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
        for tag, value in scalars)
    out += _field_bytes(5, values)
  return out


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
  """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>.<pid>`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values) -> None:
    """values: {tag: float}; one Event per call."""
    if values:
      self._file.write(tfrecord(encode_event(time.time(), step, scalars=sorted(values.items()))))
      self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def read_records(path: str) -> Iterator[bytes]:
  """Data of each TFRecord in `path`, CRCs checked (ValueError naming the file if one is bad)."""
  with open(path, "rb") as f:
    blob = f.read()
  pos = 0
  while pos < len(blob):
    header = blob[pos:pos + 12]
    if len(header) < 12:
      raise ValueError(f"truncated record header at byte {pos} of {path}")
    (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
    if masked_crc32c(header[:8]) != length_crc:
      raise ValueError(f"bad length CRC at byte {pos} of {path}")
    data = blob[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
    if len(data) != length or masked_crc32c(data) != data_crc:
      raise ValueError(f"bad data CRC at byte {pos} of {path}")
    yield data
    pos += 16 + length


def _fields(data: bytes) -> Iterator[Tuple[int, int, object]]:
  """(field, wire_type, value) of a serialized proto message (varint, fixed64, bytes, fixed32)."""
  pos = 0

  def varint():
    nonlocal pos
    shift, n = 0, 0
    while True:
      b = data[pos]
      pos += 1
      n |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return n

  while pos < len(data):
    key = varint()
    field, wire = key >> 3, key & 7
    if wire == 0:
      value = varint()
    elif wire == 1:
      value, pos = data[pos:pos + 8], pos + 8
    elif wire == 2:
      n = varint()
      value, pos = data[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = data[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield field, wire, value


def read_scalars(path: str) -> Iterator[Tuple[int, str, float]]:
  """(step, tag, value) of every scalar in an event file."""
  for data in read_records(path):
    step, summary = 0, b""
    for field, _, value in _fields(data):
      if field == 2:
        step = value
      elif field == 5:
        summary = value
    for _, _, v in _fields(summary):
      tag, val = "", None
      for f, _, x in _fields(v):
        if f == 1:
          tag = x.decode()
        elif f == 2:
          (val,) = struct.unpack("<f", x)
      if val is not None:
        yield step, tag, val
