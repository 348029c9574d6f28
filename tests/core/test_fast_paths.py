"""The ingress fast paths give exactly what aiosmtpd's own code gives: the address parser's shortcut
for ``<local@domain>`` and the per-class cache of ``auth_*`` members."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay365.ingress.server import RelaySMTP, _AuthMemberCache, _Hooks

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atom = st.text(ATEXT, min_size=1, max_size=6)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
# Mostly simple paths, plus the characters that make them not simple (quotes, comments, dots, brackets).
noise = st.text(ATEXT + ' .@<>()"[]\\\t:,;', max_size=12)
params = st.sampled_from(["", " SIZE=100", "  BODY=8BITMIME SMTPUTF8", " ", "(c) SIZE=1", "X", "\t SIZE=2"])


def outcome(fn: Callable[[str], object], arg: str) -> object:
    try:
        return fn(arg)
    except Exception as e:  # aiosmtpd's parser raises AttributeError on some inputs, such as "<a@[>"
        return type(e)


def both(arg: str, limit: int = 0) -> tuple[object, object]:
    plain = SMTP.__new__(SMTP)
    fast = RelaySMTP.__new__(RelaySMTP)
    plain.local_part_limit = fast.local_part_limit = limit
    return outcome(lambda a: SMTP._getaddr(plain, a), arg), outcome(fast._getaddr, arg)


@settings(max_examples=600, deadline=None)
@given(
    lead=st.sampled_from(["", " ", "\t", "  "]),
    local=st.one_of(dot_atom, noise),
    domain=st.one_of(dot_atom, noise),
    tail=params,
    limit=st.sampled_from([0, 3, 64]),
)
def test_address_shortcut_matches_aiosmtpd(lead: str, local: str, domain: str, tail: str, limit: int) -> None:
    expected, got = both(f"{lead}<{local}@{domain}>{tail}", limit)
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(arg=st.one_of(noise, st.text(max_size=20)))
def test_address_shortcut_matches_aiosmtpd_on_any_text(arg: str) -> None:
    expected, got = both(arg)
    assert got == expected


def test_address_shortcut_examples() -> None:
    assert both("<printer@contoso.com> SIZE=4096")[1] == ("printer@contoso.com", "SIZE=4096")
    assert both("<a@b>(comment) SIZE=1")[1] == both("<a@b>(comment) SIZE=1")[0]
    assert both('<"quoted local"@b>')[1] == ('"quoted local"@b', "")
    assert both("<toolongpart@b>", limit=4) == ((None, None), (None, None))


def test_auth_member_cache_matches_inspect() -> None:
    cache = _AuthMemberCache()
    found = {}
    for obj in (RelaySMTP.__new__(RelaySMTP), _Hooks()):
        want = [(n, m) for n, m in inspect.getmembers(obj) if n.startswith("auth_")]
        got = cache.getmembers(obj)
        assert [n for n, _ in got] == [n for n, _ in want]
        assert all(g == w for (_, g), (_, w) in zip(got, want, strict=True))
        found[type(obj).__name__] = [n for n, _ in got]
    assert found == {"RelaySMTP": ["auth_LOGIN", "auth_PLAIN"], "_Hooks": []}
    # Anything else is inspect itself.
    assert cache.getmembers(str) == inspect.getmembers(str)
    assert cache.signature is inspect.signature
