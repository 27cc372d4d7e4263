"""pccl._wire (the master protocol): framing, the schema table and the handshake MACs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccl import _wire as protocol
from pccl._wire import TO_MASTER, TO_PEER, ProtocolViolation

NONCE = b"n" * 32


def good_messages() -> list[tuple[str, dict]]:
    return [
        (
            TO_MASTER,
            {
                "type": "hello",
                "version": 1,
                "nonce": NONCE,
                "mac": b"m" * 32,
                "peer_group": 3,
                "p2p_address": "127.0.0.1:4000",
                "p2p_connections": 4,
            },
        ),
        (
            TO_MASTER,
            {
                "type": "hello",
                "version": 1,
                "nonce": NONCE,
                "mac": b"",
                "peer_group": 0,
                "p2p_address": "127.0.0.1:4001",
                "p2p_connections": 1,
                "name": "worker-7",  # optional
            },
        ),
        (TO_MASTER, {"type": "update_topology", "req": 7, "ring_ok": True, "admit": True}),
        (TO_MASTER, {"type": "pending_query", "req": 0}),
        (TO_MASTER, {"type": "ring_ready", "epoch": 2, "ok": False}),
        (TO_MASTER, {"type": "op_done", "epoch": 2, "tag": 0, "seq": 2**63 - 1, "ok": True}),
        (TO_MASTER, {"type": "heartbeat"}),
        (TO_MASTER, {"type": "leave"}),
        (
            TO_MASTER,
            {
                "type": "sync_state",
                "req": 3,
                "revision": 9,
                "strategy": "enforce_popular",
                "tensors": [
                    {"name": "w", "dtype": "float32", "shape": [2, 3], "nbytes": 24,
                     "hash": b"h" * 16},
                    {"name": "empty", "dtype": "int64", "shape": [0], "nbytes": 0,
                     "hash": b"e" * 16},
                ],
            },
        ),
        (TO_MASTER, {"type": "sync_done", "revision": 9, "ok": False}),
        (TO_PEER, {"type": "challenge", "version": 1, "nonce": NONCE, "auth": True}),
        (
            TO_PEER,
            {
                "type": "welcome",
                "peer_id": "p1",
                "mac": b"",
                "heartbeat_interval": 0.5,
                "heartbeat_timeout": 3.0,
            },
        ),
        (TO_PEER, {"type": "error", "reason": "no"}),
        (TO_PEER, {"type": "pending_reply", "req": 1, "pending": True}),
        (
            TO_PEER,
            {
                "type": "topology",
                "req": None,
                "epoch": 1,
                "changed": True,
                "rank": 0,
                "world_size": 2,
                "group_world_size": 2,
                "next": "[::1]:5000",
                "ring": ["p1", "p2"],
            },
        ),
        (TO_PEER, {"type": "topology_ready", "epoch": 1, "ok": True}),
        (TO_PEER, {"type": "op_outcome", "epoch": 1, "tag": 2, "seq": 3, "ok": False}),
        (TO_PEER, {"type": "heartbeat_ack"}),
        (TO_PEER, {"type": "abort", "epoch": 1, "reason": "p3 lost"}),
        (TO_PEER, {"type": "peer_lost", "peer_id": "p3", "reason": "connection closed"}),
        (
            TO_PEER,
            {
                "type": "topology",
                "req": 4,
                "epoch": 2,
                "changed": False,
                "rank": 1,
                "world_size": 2,
                "group_world_size": 2,
                "next": "127.0.0.1:5000",
                "ring": ["p1", "p2"],
                "run": 12345,
                "peers": [
                    {"peer_id": "p1", "num": 1, "name": "a", "group": 0, "rank": 0,
                     "address": "127.0.0.1:5000"},
                    {"peer_id": "p2", "num": 2, "name": "", "group": 0, "rank": 1,
                     "address": "127.0.0.1:5001"},
                ],
            },
        ),
        (TO_PEER, {"type": "evicted", "reason": "vote timeout"}),
        (
            TO_PEER,
            {
                "type": "sync_plan",
                "req": 3,
                "revision": 9,
                "error": "",
                "reason": "",
                "fetch": [
                    {"name": "w", "hash": b"h" * 16, "nbytes": 24,
                     "from": ["127.0.0.1:4000", "[::1]:4001"]},
                ],
                "serve": True,
            },
        ),
        (TO_PEER, {"type": "sync_end", "revision": 9, "ok": True}),
        # optimize_topology (docs/topology.md)
        (TO_MASTER, {"type": "optimize_topology", "req": 4}),
        (TO_MASTER, {"type": "probe_result", "req": 4, "src": "p2", "ok": True,
                     "bytes_per_s": 5e7, "rtt_s": 0.001, "bytes": 10**7, "seconds": 0.2,
                     "reason": ""}),
        (TO_MASTER, {"type": "op_done", "epoch": 2, "tag": 0, "seq": 1, "ok": True,
                     "link_bytes": 10**6, "link_busy_ns": 10**8}),
        (TO_PEER, {"type": "probe", "req": 4, "step": 0, "src": "p2",
                   "address": "127.0.0.1:4001", "seconds": 0.2, "connections": 4}),
        (TO_PEER, {"type": "topology_info", "req": 4, "step": 3, "ring": ["p1", "p2"],
                   "feasible": True, "reason": "", "bottleneck": 5e7,
                   "predicted_bus_bandwidth": 5e7, "probes": 2, "probe_seconds": 0.9,
                   "install": False,
                   "edges": [{"from": "p1", "to": "p2", "bytes_per_s": 5e7, "rtt_s": 0.001,
                              "age_s": 0.5, "source": "probe"}]}),
    ]


@pytest.mark.parametrize("direction,msg", good_messages(), ids=lambda v: str(v)[:20])
def test_every_message_type_round_trips(direction, msg):
    frame = protocol.encode(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert protocol.validate(protocol.decode(frame[4:]), direction) == msg


def test_schema_table_covers_the_documented_types():
    assert set(protocol.SCHEMAS[TO_MASTER]) == {
        "hello",
        "update_topology",
        "pending_query",
        "ring_ready",
        "op_done",
        "heartbeat",
        "leave",
        "sync_state",
        "sync_done",
        "optimize_topology",
        "probe_result",
    }
    assert {m["type"] for d, m in good_messages() if d == TO_PEER} == set(protocol.SCHEMAS[TO_PEER])


def test_optional_fields_are_checked_when_present():
    topo = next(m for d, m in good_messages() if m["type"] == "topology" and "peers" in m)
    bad = dict(topo, peers=[dict(topo["peers"][0], rank=-1)])
    with pytest.raises(ProtocolViolation, match="peers"):
        protocol.validate(bad, TO_PEER)
    hello = next(m for d, m in good_messages() if m["type"] == "hello")
    with pytest.raises(ProtocolViolation, match="name"):
        protocol.validate(dict(hello, name="x" * 129), TO_MASTER)
    with pytest.raises(ProtocolViolation, match="unexpected field"):
        protocol.validate(dict(hello, nickname="x"), TO_MASTER)


def test_a_type_is_only_valid_in_its_direction():
    with pytest.raises(ProtocolViolation, match="unknown message type"):
        protocol.validate({"type": "heartbeat_ack"}, TO_MASTER)
    with pytest.raises(ProtocolViolation, match="unknown message type"):
        protocol.validate({"type": "hello"}, TO_PEER)


BAD_FIELDS = [
    ("sync_state", "strategy", "popular", "expected one of"),
    ("sync_state", "tensors", [{"name": "w"}], "item 0: expected a map"),
    ("sync_state", "tensors", [{"name": "w", "dtype": "f", "shape": [-1], "nbytes": 0,
                                "hash": b"h" * 16}], "out of range"),
    ("sync_state", "tensors", [{"name": "w", "dtype": "f", "shape": [1], "nbytes": 0,
                                "hash": b"h" * 8}], "bin of 8 bytes"),
    ("sync_state", "tensors", [{"name": "", "dtype": "f", "shape": [1], "nbytes": 0,
                                "hash": b"h" * 16}], "empty str"),
    ("sync_state", "tensors", {"w": 1}, "expected array"),
    ("op_done", "epoch", -1, "out of range"),
    ("op_done", "seq", 2**63, "out of range"),
    ("op_done", "tag", True, "expected int"),
    ("op_done", "ok", 1, "expected bool"),
    ("op_done", "epoch", 1.0, "expected int"),
    ("hello", "nonce", b"short", "bin of 5 bytes"),
    ("hello", "nonce", "n" * 32, "expected bin"),
    ("hello", "mac", b"x" * 31, "bin of 31"),
    ("hello", "p2p_address", "nohost", "HOST:PORT"),
    ("hello", "p2p_address", "h:0", "port 0"),
    ("hello", "p2p_address", "h:99999", "out of range"),
    ("hello", "p2p_address", "::1:80", "brackets"),
    ("hello", "p2p_address", "h" * 300 + ":1", "at most"),
    ("hello", "peer_group", "zero", "expected int"),
    ("hello", "version", None, "expected int"),
]


@pytest.mark.parametrize("kind,field,value,error", BAD_FIELDS)
def test_bad_fields_are_rejected(kind, field, value, error):
    msg = dict(next(m for d, m in good_messages() if m["type"] == kind))
    msg[field] = value
    with pytest.raises(ProtocolViolation, match=error):
        protocol.validate(msg, TO_MASTER)


def test_missing_and_extra_fields_are_rejected():
    with pytest.raises(ProtocolViolation, match="missing field 'ok'"):
        protocol.validate({"type": "ring_ready", "epoch": 1}, TO_MASTER)
    with pytest.raises(ProtocolViolation, match="unexpected field"):
        protocol.validate({"type": "heartbeat", "x": 1}, TO_MASTER)
    with pytest.raises(ProtocolViolation, match="no str 'type'"):
        protocol.validate({"kind": "heartbeat"}, TO_MASTER)
    with pytest.raises(ProtocolViolation, match="not a map"):
        protocol.validate([1, 2], TO_MASTER)


def test_oversize_strings_are_rejected():
    with pytest.raises(ProtocolViolation, match="exceeds"):
        protocol.validate({"type": "error", "reason": "x" * 5000}, TO_PEER)
    with pytest.raises(ProtocolViolation, match="ring item"):
        protocol.validate(
            {
                "type": "topology",
                "req": 1,
                "epoch": 1,
                "changed": False,
                "rank": 0,
                "world_size": 1,
                "group_world_size": 1,
                "next": None,
                "ring": ["x" * 65],
            },
            TO_PEER,
        )


def test_welcome_durations_must_be_positive_and_finite():
    base = dict(good_messages()[8][1])
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ProtocolViolation):
            protocol.validate(dict(base, heartbeat_timeout=bad), TO_PEER)


def test_encode_refuses_oversize_message():
    with pytest.raises(ValueError):
        protocol.encode({"type": "error", "reason": "x" * (protocol.MAX_MESSAGE + 1)})


@pytest.mark.parametrize(
    "body,error",
    [
        (b"\xc1", "not msgpack"),  # never-used msgpack byte
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"type": "heartbeat"}) + b"\x00", "not msgpack"),  # trailing data
        (msgpack.packb({1: 2}), "not msgpack"),  # strict_map_key
        (msgpack.packb({"type": msgpack.ExtType(1, b"x")}), "not msgpack"),
        (msgpack.packb({"type": b"\xff"}, use_bin_type=False), "not msgpack"),  # bad utf-8
        (b"\x91" * 5000 + b"\x00", "not msgpack"),  # deep nesting
    ],
)
def test_decode_rejects_malformed_bodies(body, error):
    with pytest.raises(ProtocolViolation, match=error):
        protocol.decode(body)


# ---------------------------------------------------------------- properties

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)

field_names = st.sampled_from(
    sorted({f for table in protocol.SCHEMAS.values() for s in table.values() for f in s})
    + ["type", "x"]
)
type_names = st.sampled_from(
    sorted({t for table in protocol.SCHEMAS.values() for t in table}) + ["nope", ""]
)
near_messages = st.builds(
    lambda kind, fields: dict(fields, type=kind),
    type_names,
    st.dictionaries(field_names, msgpack_values, max_size=9),
)


def _check(obj, direction):
    try:
        protocol.validate(obj, direction)
    except ProtocolViolation:
        pass


def _decode_and_check(body: bytes) -> None:
    """``body`` decodes (then validates or not in each direction) or raises
    ProtocolViolation."""
    try:
        msg = protocol.decode(body)
    except ProtocolViolation:
        return
    _check(msg, TO_MASTER)
    _check(msg, TO_PEER)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_protocol_violation(data):
    _decode_and_check(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values | near_messages)
def test_any_msgpack_object_validates_or_raises_protocol_violation(obj):
    _decode_and_check(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=200)
@given(near_messages)
def test_validated_messages_survive_a_round_trip(msg):
    for direction in (TO_MASTER, TO_PEER):
        try:
            protocol.validate(msg, direction)
        except ProtocolViolation:
            continue
        assert protocol.decode(protocol.encode(msg)[4:]) == msg


# ---------------------------------------------------------------- framing


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_read_message_reads_one_frame():
    frame = protocol.encode({"type": "heartbeat"})
    reader = _reader(frame + frame)
    assert await protocol.read_message(reader, 1.0, TO_MASTER) == {"type": "heartbeat"}
    assert await protocol.read_message(reader, 1.0) == {"type": "heartbeat"}
    with pytest.raises(protocol.ConnectionClosed):
        await protocol.read_message(reader, 1.0)


async def test_read_message_enforces_the_cap_before_reading_the_body():
    # Only the prefix is there: the cap must trigger without waiting for a body.
    reader = _reader(struct.pack(">I", protocol.MAX_MESSAGE + 1), eof=False)
    with pytest.raises(ProtocolViolation, match="exceeds cap"):
        await protocol.read_message(reader, 5.0)
    reader = _reader(b"\xff\xff\xff\xff", eof=False)
    with pytest.raises(ProtocolViolation, match="exceeds cap"):
        await protocol.read_message(reader, 5.0)


@pytest.mark.parametrize(
    "data,error",
    [
        (b"\x00\x00", "truncated frame: 2 of 4"),
        (struct.pack(">I", 10) + b"abc", "truncated frame: 3 of 10"),
        (struct.pack(">I", 0), "empty frame"),
    ],
)
async def test_read_message_rejects_broken_frames(data, error):
    with pytest.raises(ProtocolViolation, match=error):
        await protocol.read_message(_reader(data), 1.0)


async def test_read_message_times_out():
    with pytest.raises(TimeoutError):
        await protocol.read_message(_reader(b"", eof=False), 0.05)
    reader = _reader(struct.pack(">I", 10) + b"abc", eof=False)
    with pytest.raises(ProtocolViolation, match="not received"):
        await protocol.read_message(reader, 0.05)


async def test_read_message_validates_when_given_a_direction():
    reader = _reader(protocol.encode({"type": "welcome_me"}))
    with pytest.raises(ProtocolViolation, match="unknown message type"):
        await protocol.read_message(reader, 1.0, TO_MASTER)


# ---------------------------------------------------------------- MACs


def test_hello_mac_matches_the_documented_construction():
    mac = protocol.hello_mac(b"s3cret", b"M" * 32, b"P" * 32, "10.0.0.1:7000", 12)
    data = b"pccl-hello\0" + b"M" * 32 + b"P" * 32 + b"10.0.0.1:7000" + b"\0" + b"12"
    assert mac == hmac.new(b"s3cret", data, hashlib.sha256).digest()
    assert len(mac) == protocol.MAC_LEN


def test_welcome_mac_matches_the_documented_construction():
    mac = protocol.welcome_mac(b"s3cret", b"P" * 32, b"M" * 32)
    data = b"pccl-welcome\0" + b"P" * 32 + b"M" * 32
    assert mac == hmac.new(b"s3cret", data, hashlib.sha256).digest()


def test_macs_bind_every_input():
    base = (b"k", b"M" * 32, b"P" * 32, "h:1", 0)
    mac = protocol.hello_mac(*base)
    for i, changed in enumerate((b"K", b"m" * 32, b"p" * 32, "h:2", 1)):
        args = list(base)
        args[i] = changed
        assert not protocol.macs_equal(protocol.hello_mac(*args), mac)
    # The nonces are ordered differently in the two MACs, so one can't stand in for the other.
    assert protocol.welcome_mac(b"k", b"P" * 32, b"M" * 32) != mac


def test_no_secret_means_empty_macs():
    assert protocol.hello_mac(None, NONCE, NONCE, "h:1", 0) == b""
    assert protocol.welcome_mac(None, NONCE, NONCE) == b""


def test_nonces_are_fresh():
    nonces = {protocol.new_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(len(n) == 32 for n in nonces)


def test_hostport_parsing():
    assert protocol.parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert protocol.parse_hostport("[::1]:80") == ("::1", 80)
    assert protocol.parse_hostport("h:0", allow_port_zero=True) == ("h", 0)
    assert protocol.format_hostport("::1", 5) == "[::1]:5"
    for bad in ("", ":80", "h:", "h:-1", "h:1x", "h h:1", "h:١"):
        with pytest.raises(ValueError):
            protocol.parse_hostport(bad)
