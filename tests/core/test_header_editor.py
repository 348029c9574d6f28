"""The header editor on its own: any chunking gives the same bytes or the same refusal (the socket
tests in test_ingress_headers.py show it end to end)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay365.errors import MessageRefused
from relay365.ingress.headers import HeaderEditor

RECEIVED = b"Received: from x ([127.0.0.1])\r\n\tby relay.test (relay365); date\r\n"


def run(message: bytes, cuts: list[int], *, new_from: str | None, max_size: int) -> bytes | str:
    out: list[bytes] = []
    editor = HeaderEditor(out.append, received=RECEIVED, new_from=new_from, max_size=max_size)
    pos = 0
    try:
        for cut in [*sorted({c % (len(message) + 1) for c in cuts}), len(message)]:
            if cut > pos:
                editor.write(message[pos:cut])
                pos = cut
        editor.finish()
    except MessageRefused as e:
        return e.reply[:9]
    return b"".join(out)


line = st.one_of(
    st.binary(max_size=30).map(lambda b: b"X-" + b.replace(b"\r", b"").replace(b"\n", b"") + b": v"),
    st.sampled_from([b" folded", b"\tfolded", b"From: a@b.example", b"Reply-To: c@d.example", b"x" * 999]),
)


@given(
    st.lists(line, max_size=10),
    st.binary(max_size=50).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
    st.sampled_from([None, "mailbox@contoso.com"]),
    st.sampled_from([300, 2000, 256 * 1024]),
)
@settings(max_examples=400, deadline=None)
def test_any_chunking_gives_the_same_result(
    fields: list[bytes], body: bytes, cuts: list[int], new_from: str | None, max_size: int
) -> None:
    message = b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body + b"\r\n"
    whole = run(message, [], new_from=new_from, max_size=max_size)
    assert run(message, cuts, new_from=new_from, max_size=max_size) == whole
    if isinstance(whole, str):
        return
    assert whole.startswith(RECEIVED)
    head = whole[len(RECEIVED) :].split(b"\r\n\r\n", 1)[0]
    # No device byte continues a field the relay wrote: the first line after them is a field.
    assert head[:1] not in (b" ", b"\t")
    if new_from is not None:
        assert head.startswith(b"From: mailbox@contoso.com\r\n") or head == b"From: mailbox@contoso.com"
        assert head.count(b"\r\nFrom:") == 0
    assert whole.endswith(b"\r\n" + body + b"\r\n")


def test_refusals() -> None:
    ok = "mailbox@contoso.com"
    assert run(b" x\r\nSubject: a\r\n\r\nb\r\n", [], new_from=None, max_size=1 << 20) == "550 5.6.0"
    assert run(b"S: " + b"a" * 996 + b"\r\n\r\n", [5], new_from=ok, max_size=1 << 20) == "554 5.6.0"
    assert run(b"S: " + b"a" * 995 + b"\r\n\r\n" + b"b" * 5000 + b"\r\n", [], new_from=ok, max_size=2000) != (
        "552 5.3.4"
    )
    big = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 90) for i in range(30))
    assert run(big + b"\r\nbody\r\n", [7, 900], new_from=None, max_size=2000) == "552 5.3.4"
    # A message without a header section: the rewrite adds From, the body is untouched.
    assert run(b"\r\nbody\r\n", [], new_from=ok, max_size=2000) == RECEIVED + b"From: " + ok.encode() + (
        b"\r\n\r\nbody\r\n"
    )
