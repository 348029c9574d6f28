"""The DATA parser: any chunking gives the same result; smuggling never ends data early."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay365.ingress.data import DataParser
from relay365.spool.wire import unstuff


def run_wire(
    stream: bytes, cuts: list[int], mode: str = "reject"
) -> tuple[bytes, bytes | None, str | None, int]:
    """The parser's output as spooled (wire form), the leftover, the verdict and the stuffing dots."""
    parser = DataParser(bare_newlines=mode)  # type: ignore[arg-type]
    out, pos, dots = b"", 0, 0
    for cut in [*sorted(set(c % (len(stream) + 1) for c in cuts)), len(stream)]:
        if cut <= pos:
            continue
        result = parser.feed(stream[pos:cut])
        out += result.content
        dots += result.dots
        pos = cut
        if result.leftover is not None:
            return out, result.leftover + stream[pos:], parser.invalid, dots
    return out, None, parser.invalid, dots


def run(stream: bytes, cuts: list[int], mode: str = "reject") -> tuple[bytes, bytes | None, str | None]:
    """The message itself (the wire form unstuffed); checks what holds for every wire form: no line
    that is a lone dot (it would end the data upstream), and the dots counted."""
    wire, leftover, invalid, dots = run_wire(stream, cuts, mode)
    assert b"\r\n.\r\n" not in b"\r\n" + wire
    plain = unstuff(wire)
    assert len(wire) - dots == len(plain)
    return plain, leftover, invalid


lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")),
    max_size=12,
)


@given(lines, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
@settings(max_examples=300, deadline=None)
def test_clean_messages_round_trip_under_any_chunking(body_lines: list[bytes], cuts: list[int]) -> None:
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in body_lines)
    stream = stuffed + b".\r\nQUIT\r\n"
    content, leftover, invalid = run(stream, cuts)
    assert invalid is None
    assert leftover == b"QUIT\r\n"
    assert content == b"".join(ln + b"\r\n" for ln in body_lines)


@given(
    st.sampled_from([b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\n", b"\r\n\x00.\r\n", b"\r\n.\r\r\n"]),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
@settings(max_examples=200, deadline=None)
def test_smuggling_sequences_never_end_data(seq: bytes, cuts: list[int]) -> None:
    stream = b"Subject: x\r\n\r\nhi" + seq + b"MAIL FROM:<evil@x>\r\n.\r\nNEXT\r\n"
    content, leftover, invalid = run(stream, cuts)
    assert invalid is not None and leftover == b"NEXT\r\n"  # the session discards the message
    content, leftover, invalid = run(stream, cuts, "normalize")
    assert invalid is None and leftover == b"NEXT\r\n"
    assert content.count(b"\n") == content.count(b"\r\n") and b"\x00" not in content


def test_empty_message_and_lone_dot_lines() -> None:
    assert run(b".\r\n", []) == (b"", b"", None)
    assert run(b"..\r\n.\r\n", [1, 2]) == (b".\r\n", b"", None)
    assert run(b"a\r\n", [])[1] is None  # not finished without the terminator


def test_memory_is_bounded_by_the_chunk() -> None:
    parser = DataParser()
    for _ in range(200):  # 200 x 64 KiB of one endless line
        parser.feed(b"x" * 65536)
        assert len(parser._carry) <= 8


def reference(stream: bytes, mode: str) -> tuple[bytes, bytes, str | None]:
    """RFC 5321 4.5.2 on the whole stream at once: the model the chunked parser must match."""
    data = b"\r\n" + stream
    end = data.find(b"\r\n.\r\n")
    body, leftover = data[: end + 2], data[end + 5 :]
    crlf = body.count(b"\r\n")
    if b"\x00" in body or body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        if mode == "reject":
            return b"", leftover, "bare CR, bare LF or NUL in message data"
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        body = body.replace(b"\x00", b"")
    return body.replace(b"\r\n.", b"\r\n")[2:], leftover, None


@given(
    st.binary(max_size=300).map(lambda b: bytes(b"\r\n.\x00ab"[x % 6] for x in b)),
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    st.sampled_from(["reject", "normalize"]),
)
@settings(max_examples=1500, deadline=None)
def test_chunked_parser_matches_the_whole_stream_model(body: bytes, cuts: list[int], mode: str) -> None:
    stream = body + b"\r\n.\r\nQUIT\r\n"
    content, leftover, invalid = run(stream, cuts, mode)
    want_content, want_leftover, want_invalid = reference(stream, mode)
    assert (leftover, invalid) == (want_leftover, want_invalid)
    if invalid is None:  # an invalid message is discarded whole by the session, whatever came before
        assert content == want_content


def test_clean_content_is_the_wire_form_as_sent() -> None:
    """What the device sent is what is spooled: dot-stuffed lines stay stuffed (delivery sends the
    file as it lies), and the dots are counted out of the message size."""
    stream = b"Subject: dots\r\n\r\n..leading\r\n...two\r\nplain\r\n.\r\n"
    wire, leftover, invalid, dots = run_wire(stream, [7, 30])
    assert (wire, leftover, invalid, dots) == (stream[:-3], b"", None, 2)
