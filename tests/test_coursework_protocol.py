"""The grader decodes what a submission's child process sends: anything malformed is a
ProtocolError (never pickle, never another exception), and well-formed trees round-trip."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minimixer.coursework import protocol

arrays = hnp.arrays(dtype=st.sampled_from([np.float64, np.float32, np.int64, np.bool_]),
                    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | arrays
trees = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.lists(c, max_size=3).map(tuple)
                     | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10)


def same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=50, deadline=None)
@given(trees)
def test_round_trip(tree):
    assert same(tree, protocol.decode(protocol.encode(tree)))


@settings(max_examples=100, deadline=None)
@given(trees, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 64))
def test_mutated_messages_are_protocol_errors(tree, flips, cut):
    data = bytearray(protocol.encode(tree))
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[:len(data) - cut]) if cut < len(data) else bytes(data)
    try:
        protocol.decode(data)
    except protocol.ProtocolError:
        pass


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\xff\xff\xff\xff{}", b"\x02\x00\x00\x00[]",
                                     b"\x11\x00\x00\x00" + b'{"@a": 0, "dtype": "|O", "shape": []}'[:17],
                                     protocol.encode(np.zeros(3))[:-1]])
def test_refused(payload):
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(payload)


def test_objects_are_named_not_sent():
    class Mine:
        pass
    out = protocol.decode(protocol.encode((Mine(), np.array([object()]))))
    assert repr(out[0]) == "a Mine" and repr(out[1]) == "an array of dtype object"
    header = b'{"@a": 0, "dtype": "|O8", "shape": [1]}'
    with pytest.raises(protocol.ProtocolError, match="refused"):
        protocol.decode(len(header).to_bytes(4, "little") + header + b"\0" * 8)
