"""The routed-experts wire format: one self-describing blob per request, never nested lists.

Byte layout, version 1 (all integers little-endian)::

    offset size  field
    0      4     magic b"R3EX"
    4      1     version (1)
    5      1     dtype code: 1 = uint8, 2 = uint16, 3 = int32
    6      2     reserved, 0
    8      4     num_experts (uint32): routed (logical) experts of the model
    12     4     rows (uint32): token positions in the blob
    16     4     layers (uint32)
    20     4     top_k (uint32)
    24     8     start (uint64): position of the first row in the request's sequence
    32     8     end (uint64): one past the last row's position (end - start == rows)
    40     ...   rows * layers * top_k ids, C order ([row][layer][k]), in the dtype's size

The dtype is the smallest that holds every id of the model: uint8 when ``num_experts <= 255``,
uint16 when ``<= 65535``, int32 otherwise. Padding (``-1``, "no expert") is stored as the
dtype's all-ones value (``0xFF``, ``0xFFFF``; ``-1`` itself for int32): that is why uint8 stops at
255 experts, not 256. Decoders map it back to ``-1``.

JSON transport uses the standard base64 alphabet with padding (``encode_routed_experts_base64``);
``decode_routed_experts`` takes the bytes or that text.

Importing this module imports neither torch nor numpy; ``decode_routed_experts_pure`` is a
decoder in plain Python (``struct`` and ``array``) that other languages can follow line by line.
"""

from __future__ import annotations

import base64
import binascii
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Tuple, Union

from moe_a2a.errors import MoeA2AError

if TYPE_CHECKING:
    import torch

MAGIC = b"R3EX"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIIIQQ")  # 40 bytes
HEADER_SIZE = HEADER.size


class WireDType(NamedTuple):
    code: int
    name: str
    itemsize: int
    array_code: str   # Python ``array`` type code of the same size
    padding: int      # the stored value that means -1


WIRE_DTYPES = {
    1: WireDType(1, "uint8", 1, "B", 0xFF),
    2: WireDType(2, "uint16", 2, "H", 0xFFFF),
    3: WireDType(3, "int32", 4, "i", -1),
}


class RoutedExpertsWireError(MoeA2AError):
    """A blob or an id array that the wire format cannot represent or read."""


def wire_dtype(num_experts: int) -> WireDType:
    """The dtype a blob of a model with ``num_experts`` routed experts uses."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise RoutedExpertsWireError(f"num_experts={num_experts!r} must be an integer >= 1 (the "
                                     f"model's routed experts)")
    if num_experts <= 0xFF:
        return WIRE_DTYPES[1]
    if num_experts <= 0xFFFF:
        return WIRE_DTYPES[2]
    if num_experts <= 0x7FFFFFFF:
        return WIRE_DTYPES[3]
    raise RoutedExpertsWireError(f"num_experts={num_experts} exceeds int32 ids")


@dataclass(frozen=True, kw_only=True)
class RoutedExperts:
    """One decoded blob.

    Attributes:
        ids: ``[rows, layers, top_k]`` int32 logical expert ids, ``-1`` = padding.
        start / end: positions ``[start, end)`` of the rows in the request's sequence.
        num_experts: routed experts of the model that wrote it.
        version: wire format version.
    """

    ids: "torch.Tensor"
    start: int
    end: int
    num_experts: int
    version: int = VERSION

    @property
    def rows(self) -> int:
        return self.end - self.start


class PureRoutedExperts(NamedTuple):
    """``decode_routed_experts_pure``'s result: ``values`` is the flat C-order id array."""

    start: int
    end: int
    num_experts: int
    shape: Tuple[int, int, int]
    values: array


# ---- encoding ------------------------------------------------------------------------------

def encode_routed_experts(ids: Any, *, num_experts: int, start: int = 0) -> bytes:
    """One request's routed experts as a blob (layout in the module docstring).

    Args:
        ids: ``[rows, layers, top_k]`` integer logical expert ids in ``[0, num_experts)`` or
            ``-1`` (padding): a torch tensor, a numpy array or nested sequences.
        num_experts: the model's routed experts (chooses the dtype).
        start: position of the first row in the request's sequence (``>= 0``).
    Returns:
        ``40 + rows * layers * top_k * itemsize`` bytes.
    """
    import torch

    kind = wire_dtype(num_experts)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise RoutedExpertsWireError(f"start={start!r} must be an integer >= 0 (the position of "
                                     f"the first row)")
    t = ids.detach().cpu() if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if t.dim() != 3:
        raise RoutedExpertsWireError(f"ids has shape {tuple(t.shape)}; expected [rows, layers, "
                                     f"top_k]")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RoutedExpertsWireError(f"ids has dtype {t.dtype}; expected an integer dtype")
    rows, layers, top_k = (int(s) for s in t.shape)
    if max(rows, layers, top_k) > 0xFFFFFFFF:
        raise RoutedExpertsWireError(f"ids shape {tuple(t.shape)} exceeds the uint32 header fields")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8):
        t = t.to(torch.int64)  # unsigned inputs: -1 cannot be in them, but compare signed
    if t.numel():
        low, high = (int(v) for v in torch.aminmax(t))
        if low < -1 or high >= num_experts:
            bad = low if low < -1 else high
            raise RoutedExpertsWireError(
                f"ids hold {bad}, outside [0, {num_experts}) and not the padding -1; fix: pass "
                f"logical expert ids of a model with num_experts={num_experts}")
    header = HEADER.pack(MAGIC, VERSION, kind.code, 0, num_experts, rows, layers, top_k,
                         start, start + rows)
    return header + _payload_bytes(t.reshape(-1), kind)


def encode_routed_experts_base64(ids: Any, *, num_experts: int, start: int = 0) -> str:
    """``encode_routed_experts`` as standard base64 text (for JSON)."""
    return base64.b64encode(encode_routed_experts(ids, num_experts=num_experts,
                                                  start=start)).decode("ascii")


def _payload_bytes(flat: "torch.Tensor", kind: WireDType) -> bytes:
    """Little-endian values; a wrapping cast stores -1 as the unsigned dtype's all-ones."""
    np = _numpy()
    if np is not None:
        return flat.numpy().astype(f"<{_np_code(kind)}", copy=False).tobytes()
    values = array(kind.array_code, (v & (2 ** (8 * kind.itemsize) - 1) if kind.padding != -1
                                     else v for v in flat.tolist()))  # pragma: no cover
    if sys.byteorder != "little":  # pragma: no cover
        values.byteswap()
    return values.tobytes()


# ---- decoding ------------------------------------------------------------------------------

def decode_routed_experts(blob: Union[bytes, bytearray, memoryview, str]) -> RoutedExperts:
    """A blob (bytes, or its base64 text) back to ``RoutedExperts`` (ids as an int32 tensor)."""
    import torch

    data = _as_bytes(blob)
    header = _parse_header(data)
    start, end, num_experts, shape, kind = header
    payload = memoryview(data)[HEADER_SIZE:]
    np = _numpy()
    if np is not None:
        raw = np.frombuffer(payload, dtype=f"<{_np_code(kind)}")
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        ids = torch.from_numpy(raw.astype(np.int32))
    else:  # pragma: no cover - torch without numpy
        ids = torch.tensor(_pure_values(payload, kind), dtype=torch.int32)
        low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
    if kind.padding != -1 and high == kind.padding:  # only then is there padding to map
        ids[ids == kind.padding] = -1
        high = int(ids.max())
    if high >= num_experts or low < -1:
        bad = high if high >= num_experts else low
        raise RoutedExpertsWireError(f"blob holds expert id {bad}, outside [0, {num_experts})")
    return RoutedExperts(ids=ids.reshape(shape), start=start, end=end, num_experts=num_experts,
                         version=VERSION)


def decode_routed_experts_pure(blob: Union[bytes, bytearray, memoryview, str]) -> PureRoutedExperts:
    """The same decoding in plain Python (no torch, no numpy): a model for other languages."""
    data = _as_bytes(blob)
    start, end, num_experts, shape, kind = _parse_header(data)
    values = _pure_values(memoryview(data)[HEADER_SIZE:], kind)
    out = array("i", (-1 if v == kind.padding else v for v in values))
    for v in out:
        if v >= num_experts or v < -1:
            raise RoutedExpertsWireError(f"blob holds expert id {v}, outside [0, {num_experts})")
    return PureRoutedExperts(start, end, num_experts, shape, out)


def _pure_values(payload: memoryview, kind: WireDType) -> array:
    values = array(kind.array_code)
    values.frombytes(bytes(payload))
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _as_bytes(blob: Union[bytes, bytearray, memoryview, str]) -> bytes:
    if isinstance(blob, str):
        try:
            return base64.b64decode(blob.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise RoutedExpertsWireError(f"routed-experts text is not base64 ({exc}); pass the "
                                         f"blob bytes or encode_routed_experts_base64's text") from exc
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return bytes(blob)
    raise RoutedExpertsWireError(f"cannot decode a {type(blob).__name__}: pass bytes or base64 text")


def _parse_header(data: bytes) -> Tuple[int, int, int, Tuple[int, int, int], WireDType]:
    if len(data) < HEADER_SIZE:
        raise RoutedExpertsWireError(f"blob has {len(data)} bytes, shorter than the "
                                     f"{HEADER_SIZE}-byte header")
    magic, version, code, _reserved, num_experts, rows, layers, top_k, start, end = \
        HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RoutedExpertsWireError(f"blob starts with {magic!r}, not {MAGIC!r}: not a "
                                     f"routed-experts blob")
    if version != VERSION:
        raise RoutedExpertsWireError(f"blob has format version {version}; this release reads "
                                     f"version {VERSION}: upgrade moe-a2a")
    kind = WIRE_DTYPES.get(code)
    if kind is None:
        raise RoutedExpertsWireError(f"blob has dtype code {code}; known: "
                                     f"{', '.join(f'{c}={k.name}' for c, k in WIRE_DTYPES.items())}")
    if end - start != rows:
        raise RoutedExpertsWireError(f"blob header says rows={rows} but [start, end) = "
                                     f"[{start}, {end})")
    want = HEADER_SIZE + rows * layers * top_k * kind.itemsize
    if len(data) != want:
        raise RoutedExpertsWireError(f"blob has {len(data)} bytes; its header "
                                     f"([{rows}, {layers}, {top_k}] {kind.name}) needs {want}")
    return start, end, num_experts, (rows, layers, top_k), kind


def _np_code(kind: WireDType) -> str:
    return {"uint8": "u1", "uint16": "u2", "int32": "i4"}[kind.name]


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with every torch wheel we test
        return None
    return numpy


__all__ = ["HEADER_SIZE", "MAGIC", "PureRoutedExperts", "RoutedExperts", "RoutedExpertsWireError",
           "VERSION", "WIRE_DTYPES", "decode_routed_experts", "decode_routed_experts_pure",
           "encode_routed_experts", "encode_routed_experts_base64", "wire_dtype"]
