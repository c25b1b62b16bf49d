"""The routed-experts wire format: round trips (property-tested), dtype choice, the -1 sentinel,
the documented byte layout, the plain-Python decoder and bad blobs."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_a2a
from moe_a2a.routed_experts_wire import (HEADER_SIZE, RoutedExpertsWireError,
                                         decode_routed_experts_pure, wire_dtype)

EXPERT_COUNTS = (8, 255, 256, 384)


@st.composite
def routed_ids(draw):
    num_experts = draw(st.sampled_from(EXPERT_COUNTS))
    rows = draw(st.integers(0, 12))
    layers = draw(st.integers(1, 4))
    top_k = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, num_experts, (rows, layers, top_k), generator=gen, dtype=torch.int32)
    # the extremes of the range are always present when there is room for them
    if ids.numel() >= 3:
        ids.view(-1)[:3] = torch.tensor([-1, 0, num_experts - 1])
    return ids, num_experts, draw(st.integers(0, 2**40))


@settings(max_examples=200, deadline=None)
@given(routed_ids())
def test_round_trip(case):
    ids, num_experts, start = case
    blob = moe_a2a.encode_routed_experts(ids, num_experts=num_experts, start=start)
    out = moe_a2a.decode_routed_experts(blob)
    assert out.ids.dtype == torch.int32 and torch.equal(out.ids, ids)
    assert (out.start, out.end, out.num_experts) == (start, start + ids.shape[0], num_experts)
    itemsize = {8: 1, 255: 1, 256: 2, 384: 2}[num_experts]
    assert len(blob) == HEADER_SIZE + ids.numel() * itemsize
    text = moe_a2a.encode_routed_experts_base64(ids, num_experts=num_experts, start=start)
    assert base64.b64decode(text) == blob
    assert torch.equal(moe_a2a.decode_routed_experts(text).ids, ids)
    pure = decode_routed_experts_pure(blob)
    assert pure.shape == tuple(ids.shape) and list(pure.values) == ids.reshape(-1).tolist()
    assert (pure.start, pure.end) == (start, start + ids.shape[0])


def test_dtype_from_expert_count_and_sentinel_storage():
    assert [wire_dtype(e).name for e in (1, 255, 256, 65535, 65536)] == \
        ["uint8", "uint8", "uint16", "uint16", "int32"]
    ids = torch.tensor([[[254, -1]]])
    blob = moe_a2a.encode_routed_experts(ids, num_experts=255)
    assert blob[HEADER_SIZE:] == bytes([254, 0xFF])  # -1 is stored as all ones
    wide = moe_a2a.encode_routed_experts(torch.tensor([[[65534, -1]]]), num_experts=65535)
    assert wide[HEADER_SIZE:] == struct.pack("<HH", 65534, 0xFFFF)
    huge = moe_a2a.encode_routed_experts(torch.tensor([[[70000, -1]]]), num_experts=70001)
    assert huge[HEADER_SIZE:] == struct.pack("<ii", 70000, -1)
    assert torch.equal(moe_a2a.decode_routed_experts(huge).ids, torch.tensor([[[70000, -1]]],
                                                                              dtype=torch.int32))


def test_documented_header_layout():
    blob = moe_a2a.encode_routed_experts(torch.zeros(3, 2, 4, dtype=torch.int64), num_experts=384,
                                         start=7)
    fields = struct.unpack_from("<4sBBHIIIIQQ", blob)
    assert fields == (b"R3EX", 1, 2, 0, 384, 3, 2, 4, 7, 10)
    assert HEADER_SIZE == 40 and len(blob) == 40 + 3 * 2 * 4 * 2


def test_accepts_numpy_and_nested_sequences():
    numpy = pytest.importorskip("numpy")
    arr = numpy.array([[[1, 2]], [[3, -1]]], dtype=numpy.int64)
    a = moe_a2a.encode_routed_experts(arr, num_experts=8)
    b = moe_a2a.encode_routed_experts(arr.tolist(), num_experts=8)
    assert a == b and moe_a2a.decode_routed_experts(a).ids.tolist() == arr.tolist()


@pytest.mark.parametrize("ids, kwargs, match", [
    (torch.zeros(2, 3), {"num_experts": 8}, r"shape \(2, 3\); expected \[rows, layers, top_k\]"),
    (torch.zeros(1, 1, 1), {"num_experts": 8}, "dtype torch.float32"),
    (torch.tensor([[[8]]]), {"num_experts": 8}, r"hold 8, outside \[0, 8\)"),
    (torch.tensor([[[-2]]]), {"num_experts": 8}, "hold -2"),
    (torch.tensor([[[1]]]), {"num_experts": 0}, "num_experts=0"),
    (torch.tensor([[[1]]]), {"num_experts": 8, "start": -1}, "start=-1"),
])
def test_encode_rejects(ids, kwargs, match):
    with pytest.raises(RoutedExpertsWireError, match=match):
        moe_a2a.encode_routed_experts(ids, **kwargs)


def test_decode_rejects_bad_blobs():
    good = moe_a2a.encode_routed_experts(torch.tensor([[[1, 2]]]), num_experts=8, start=3)
    cases = [
        (good[:10], "shorter than the 40-byte header"),
        (b"XXXX" + good[4:], "not a routed-experts blob"),
        (good[:4] + bytes([2]) + good[5:], "format version 2"),
        (good[:5] + bytes([9]) + good[6:], "dtype code 9"),
        (good + b"\0", "needs 42"),
        (good[:32] + struct.pack("<Q", 9) + good[40:], r"rows=1 but \[start, end\) = \[3, 9\)"),
        (good[:40] + bytes([8, 1]), r"expert id 8, outside \[0, 8\)"),
        ("not base64!", "not base64"),
    ]
    for blob, match in cases:
        with pytest.raises(RoutedExpertsWireError, match=match):
            moe_a2a.decode_routed_experts(blob)
    with pytest.raises(RoutedExpertsWireError, match="expert id 8"):
        decode_routed_experts_pure(good[:40] + bytes([8, 1]))


def test_pure_decoder_needs_neither_torch_nor_numpy():
    blob = moe_a2a.encode_routed_experts(torch.tensor([[[5, -1]], [[0, 7]]]), num_experts=300,
                                         start=2)
    code = ("import sys, base64\n"
            "sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
            "from moe_a2a.routed_experts_wire import decode_routed_experts_pure\n"
            f"r = decode_routed_experts_pure(base64.b64decode({base64.b64encode(blob)!r}))\n"
            "print(r.start, r.end, r.shape, list(r.values))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 4 (2, 1, 2) [5, -1, 0, 7]"
