"""Both framings against bytes written out by hand from the facts and from real recordings."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_seccomp.nri import mux, ttrpc
from nri_seccomp.nri.pb import nri_pb2, ttrpc_pb2

from .examples import examples
from .wire import wire_dirs


def test_mux_header_by_hand() -> None:
    # conn 2, 3 payload bytes: u32 BE conn | u32 BE length | payload
    assert mux.encode(2, b"abc") == b"\x00\x00\x00\x02\x00\x00\x00\x03abc"


def test_ttrpc_header_by_hand() -> None:
    # length 2 | stream 5 | type 2 (response) | flags 0
    assert ttrpc.encode_frame(5, ttrpc.TYPE_RESPONSE, b"\x10\x08") == (
        b"\x00\x00\x00\x02\x00\x00\x00\x05\x02\x00\x10\x08"
    )


def test_register_plugin_request_by_hand() -> None:
    # What containerd's own recording shows for plugin "probe", index "10"; the
    # timeout varint (4998950177 ns) is written out by hand below.
    timeout = bytes([0xA1, 0xDA, 0xD7, 0xCF, 0x12])
    register = b"\x0a\x05probe\x12\x0210"
    envelope = (
        b"\x0a\x1c" + b"nri.pkg.api.v1alpha1.Runtime"
        + b"\x12\x0e" + b"RegisterPlugin"
        + b"\x1a\x0b" + register
        + b"\x20" + timeout
    )
    expected = (
        b"\x00\x00\x00\x02" + b"\x00\x00\x00\x4b"                    # mux: conn 2, 75 bytes
        + b"\x00\x00\x00\x41" + b"\x00\x00\x00\x01" + b"\x01\x00"  # ttrpc: 65 bytes, stream 1
        + envelope
    )
    req = ttrpc_pb2.Request(
        service="nri.pkg.api.v1alpha1.Runtime",
        method="RegisterPlugin",
        payload=nri_pb2.RegisterPluginRequest(plugin_name="probe", plugin_idx="10")
        .SerializeToString(),
        timeout_nano=4998950177,
    )
    ours = mux.encode(2, ttrpc.encode_frame(1, ttrpc.TYPE_REQUEST, req.SerializeToString()))
    assert ours == expected


def test_configure_response_by_hand() -> None:
    # Response{payload = ConfigureResponse{events = 8}} on conn 1, stream 1
    expected = (
        b"\x00\x00\x00\x01\x00\x00\x00\x0e"
        + b"\x00\x00\x00\x04\x00\x00\x00\x01\x02\x00"
        + b"\x12\x02" + b"\x10\x08"
    )
    payload = nri_pb2.ConfigureResponse(events=8).SerializeToString()
    body = ttrpc_pb2.Response(payload=payload).SerializeToString()
    assert mux.encode(1, ttrpc.encode_frame(1, ttrpc.TYPE_RESPONSE, body)) == expected


def test_error_status_by_hand() -> None:
    # Response{status = Status{code = 12, message = "x"}}
    assert ttrpc.error_response(12, "x") == b"\x0a\x05\x08\x0c\x12\x01x"


def test_large_write_is_chunked_and_reassembled() -> None:
    data = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB
    encoded = mux.encode(1, data)
    demux = mux.Demuxer()
    chunks = demux.feed(encoded)
    # containerd reads at most 4096 bytes per chunk (see mux.WRITE_CHUNK)
    assert {len(p) for _, p in chunks} == {4096}
    assert len(chunks) == 5 * 1024 * 1024 // 4096
    assert b"".join(p for _, p in chunks) == data
    assert demux.pending == 0


def test_write_chunks_by_hand() -> None:
    # 4097 bytes: one full 4096-byte chunk, then 1 byte; both on conn 1
    encoded = mux.encode(1, b"a" * 4096 + b"b")
    assert encoded == (b"\x00\x00\x00\x01\x00\x00\x10\x00" + b"a" * 4096
                       + b"\x00\x00\x00\x01\x00\x00\x00\x01" + b"b")
    assert mux.encode(2, b"c" * 4096) == b"\x00\x00\x00\x02\x00\x00\x10\x00" + b"c" * 4096


def test_reads_accept_nri_writers_large_chunks() -> None:
    # NRI's Go writer sends a whole ttrpc frame (up to 4 MiB + 10) as one chunk
    big = b"z" * (4 * 1024 * 1024 + 10)
    out = mux.Demuxer().feed(mux.encode(1, big, chunk=len(big)))
    assert out == [(1, big)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00\x00\x00\x00\x00\x01x", "reserved connection id 0"),
        (b"\x00\x00\x00\x01\x00\x40\x00\x0b", "exceeds the limit of 4194314 bytes"),
    ],
    ids=["conn-0", "over-limit"],
)
def test_demuxer_rejects(data: bytes, message: str) -> None:
    with pytest.raises(mux.MuxError, match=message):
        mux.Demuxer().feed(data)


def test_truncated_header_waits_for_more() -> None:
    demux = mux.Demuxer()
    assert demux.feed(b"\x00\x00\x00\x01\x00\x00") == []
    assert demux.pending == 6
    assert demux.feed(b"\x00\x01z") == [(1, b"z")]


def _parse_stream(data: bytes, feed_size: int | None = None) -> list[tuple[int, ttrpc.Frame]]:
    demux = mux.Demuxer()
    chunks: list[tuple[int, bytes]] = []
    step = feed_size or len(data) or 1
    for i in range(0, len(data), step):
        chunks.extend(demux.feed(data[i : i + step]))
    assert demux.pending == 0
    streams: dict[int, bytes] = {}
    order: list[tuple[int, ttrpc.Frame]] = []
    for conn, payload in chunks:
        buf = streams.get(conn, b"") + payload
        while len(buf) >= 10:
            length, stream, type_, flags = ttrpc.HEADER.unpack_from(buf)
            if len(buf) < 10 + length:
                break
            order.append((conn, ttrpc.Frame(stream, type_, flags, buf[10 : 10 + length])))
            buf = buf[10 + length :]
        streams[conn] = buf
    assert all(not rest for rest in streams.values())
    return order


@pytest.mark.parametrize("recording", wire_dirs(), ids=lambda p: p.name)
def test_golden_recordings_decode_and_reencode(recording) -> None:  # type: ignore[no-untyped-def]
    expected = [json.loads(line) for line in (recording / "frames.jsonl").read_text().splitlines()]
    for direction in ("r2p", "p2r"):
        raw = (recording / f"{direction}.bin").read_bytes()
        frames = _parse_stream(raw)
        # byte-at-a-time gives the same result
        assert _parse_stream(raw, feed_size=1) == frames
        want = [e for e in expected if e["dir"] == direction]
        assert len(frames) == len(want)
        rebuilt = b""
        for (conn, frame), rec in zip(frames, want, strict=True):
            assert conn == rec["mux_conn"]
            assert frame.stream_id == rec["ttrpc_stream"]
            assert frame.type == {"request": 1, "response": 2}[rec["ttrpc_type"]]
            if frame.type == 1:
                req = ttrpc_pb2.Request.FromString(frame.payload)
                assert (req.service.rsplit(".", 1)[1], req.method) == (
                    rec["service"].rsplit(".", 1)[1],
                    rec["method"],
                )
                assert len(req.payload) == rec["payload_len"]
            chunk = mux.encode(conn, ttrpc.encode_frame(frame.stream_id, frame.type, frame.payload))
            assert chunk.hex() == rec["hex"]
            rebuilt += chunk
        assert rebuilt == raw


@pytest.mark.parametrize("recording", wire_dirs(), ids=lambda p: p.name)
def test_golden_create_container_decodes(recording) -> None:  # type: ignore[no-untyped-def]
    frames = _parse_stream((recording / "r2p.bin").read_bytes())
    creates = [
        ttrpc_pb2.Request.FromString(f.payload)
        for _, f in frames
        if f.type == 1 and ttrpc_pb2.Request.FromString(f.payload).method == "CreateContainer"
    ]
    assert len(creates) == 1
    assert {(kv.key, kv.value) for kv in creates[0].metadata} == {
        ("containerd-namespace-ttrpc", "k8s.io")
    }
    req = nri_pb2.CreateContainerRequest.FromString(creates[0].payload)
    linux = req.container.linux
    assert not linux.HasField("seccomp_policy")
    name = recording.name
    if name.endswith("-unset"):
        assert not linux.HasField("seccomp_profile")
    elif name.endswith("-runtimedefault"):
        assert linux.HasField("seccomp_profile")
        assert linux.seccomp_profile.profile_type == nri_pb2.SecurityProfile.RUNTIME_DEFAULT
    else:
        assert linux.seccomp_profile.profile_type == nri_pb2.SecurityProfile.UNCONFINED
    assert req.container.name
    assert req.pod.annotations
    if "nri-v0.12.2" in name:
        assert req.container.image.name


_frame = st.tuples(st.integers(1, 5), st.binary(max_size=64))


@given(st.lists(_frame, max_size=8), st.lists(st.integers(1, 40), min_size=1, max_size=20))
@settings(max_examples=examples(300), deadline=None)
def test_demuxer_any_split(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(mux.encode(c, p) for c, p in frames)
    demux = mux.Demuxer()
    out: list[tuple[int, bytes]] = []
    pos = 0
    i = 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out.extend(demux.feed(data[pos : pos + step]))
        pos += step
        i += 1
    assert out == frames
    assert demux.pending == 0


@given(st.binary(max_size=512))
@settings(max_examples=examples(500), deadline=None)
def test_demuxer_garbage_never_crashes(data: bytes) -> None:
    demux = mux.Demuxer(max_payload=1024)
    try:
        for conn, payload in demux.feed(data):
            assert conn != 0 and len(payload) <= 1024
    except mux.MuxError:
        pass


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 70000, 2_000_000])
def test_a_serialised_adjustment_is_framed_as_protobuf_would(size: int) -> None:
    """The stub sends a cached, serialised ContainerAdjustment as CreateContainerResponse
    field 1 by hand: the bytes must equal what protobuf itself writes."""
    from nri_seccomp.nri.stub import varint

    adjust = nri_pb2.ContainerAdjustment()
    if size:
        adjust.annotations["k"] = "v" * size
    raw = adjust.SerializeToString()
    by_hand = b"\x0a" + varint(len(raw)) + raw
    assert by_hand == nri_pb2.CreateContainerResponse(adjust=adjust).SerializeToString()
    # and the stub's own framing, kept or not
    from nri_seccomp.nri.stub import Identity, Stub

    stub = Stub(object(), Identity("x", "10"))
    assert stub._framed(raw) == stub._framed(raw) == by_hand


def test_framed_answers_kept_are_bounded() -> None:
    """Answers are framed once per adjustment, but what is kept for that stays bounded
    in count and in size, whatever the plugin answers."""
    from nri_seccomp.nri.stub import FRAMED_KEPT, FRAMED_MAX, Identity, Stub

    stub = Stub(object(), Identity("x", "10"))
    for i in range(3 * FRAMED_KEPT):
        stub._framed(nri_pb2.ContainerAdjustment(annotations={"i": str(i)}).SerializeToString())
        assert len(stub._responses) <= FRAMED_KEPT
    big = nri_pb2.ContainerAdjustment(annotations={"k": "v" * FRAMED_MAX}).SerializeToString()
    stub._framed(big)
    assert big not in stub._responses
