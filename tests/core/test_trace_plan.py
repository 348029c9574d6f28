"""The message trace client's pure parts: the query plan and the request budget (virtual clock)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay365.tracing import TokenBucket, TraceRequest, TraceStatus, plan
from relay365.tracing.model import TraceRecord, normalize_message_id
from relay365.tracing.plan import DAY, LAG, LEAD, MAX_AGE, MAX_INTERVAL, SKEW, odata_time

NOW = 1_800_000_000.0


def request(
    n: int, at: float, sender: str | None = "scanner@contoso.test", rcpt: str = "alice@contoso.test"
) -> TraceRequest:
    return TraceRequest(f"<m{n}@relay>", rcpt, at, sender=sender)


def test_a_few_messages_are_asked_by_message_id_within_a_bounded_period() -> None:
    result = plan(
        [request(1, NOW - 3600), request(2, NOW - 1800), request(2, NOW - 1800, rcpt="bob@x")], now=NOW
    )
    assert [q.message_id for q in result.queries] == ["<m1@relay>", "<m2@relay>"]
    first = result.queries[0]
    start, end = odata_time(NOW - 3600 - LEAD), odata_time(NOW - SKEW)  # never later than now
    assert first.filter() == (
        f"receivedDateTime ge {start} and receivedDateTime le {end} and messageId eq '<m1@relay>'"
    )


def test_many_messages_share_one_windowed_query_narrowed_by_a_common_sender() -> None:
    batch = [request(n, NOW - 5000 + n) for n in range(50)]
    [query] = plan(batch, now=NOW).queries
    assert query.message_id is None and query.sender == "scanner@contoso.test" and query.recipient is None
    mixed = [request(n, NOW - 5000 + n, sender=f"s{n % 2}@contoso.test") for n in range(50)]
    [query] = plan(mixed, now=NOW).queries
    assert query.sender is None and query.recipient == "alice@contoso.test"
    assert "senderAddress" not in query.filter()


def test_quotes_in_values_are_doubled() -> None:
    [query] = plan([TraceRequest("<o'brien@relay>", "a@b", NOW - 60)], now=NOW).queries
    assert query.filter().endswith("messageId eq '<o''brien@relay>'")


def test_requests_older_than_the_trace_keeps_are_not_asked() -> None:
    old = request(1, NOW - 91 * DAY)
    result = plan([old, request(2, NOW - 60)], now=NOW)
    assert result.expired == (old,) and len(result.queries) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=89 * DAY), min_size=1, max_size=60))
def test_every_window_obeys_microsofts_rules_and_covers_its_requests(ages: list[float]) -> None:
    requests = [request(n, NOW - age) for n, age in enumerate(ages)]
    result = plan(requests, now=NOW)
    assert not result.expired
    for query in result.queries:
        assert query.end - query.start <= MAX_INTERVAL < 10 * DAY
        assert query.start >= NOW - MAX_AGE > NOW - 90 * DAY and query.end <= NOW - SKEW
    for r in requests:  # covered up to a minute ago (later mail: the next lookup)
        seen = min(r.sent_at, NOW - SKEW)
        assert any(
            q.start <= seen <= q.end and q.end >= min(r.sent_at + LAG, NOW - SKEW) for q in result.queries
        )


def test_status_values_and_records_as_graph_sends_them() -> None:
    record = TraceRecord.from_graph(
        {
            "id": "t1",
            "senderAddress": "A@B",
            "recipientAddress": "C@D",
            "messageId": "<X@Y>",
            "receivedDateTime": "2026-01-21T14:12:34Z",
            "subject": "s",
            "size": 5,
            "fromIP": "203.0.113.5",
            "toIP": "",
            "status": "filteredAsSpam",
        }
    )
    assert record.status is TraceStatus.FILTERED_AS_SPAM and record.status.after_acceptance_problem
    assert record.key == (normalize_message_id("x@y"), "c@d") and record.sender == "a@b"
    assert TraceStatus.parse("Delivered") is TraceStatus.DELIVERED and TraceStatus.DELIVERED.final
    assert not TraceStatus.GETTING_STATUS.final and not TraceStatus.PENDING.final
    assert TraceStatus.parse("somethingNew") is TraceStatus.UNKNOWN_FUTURE_VALUE


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


async def test_the_budget_never_grants_more_than_80_in_any_five_minutes() -> None:
    time = VirtualTime()
    bucket = TokenBucket.for_quota(requests=100, window=300, share=0.8, clock=time.clock, sleep=time.sleep)
    grants: list[float] = []
    for _ in range(500):
        await bucket.acquire()
        grants.append(time.now)
    for i, start in enumerate(grants):
        in_window = sum(1 for t in grants[i:] if t < start + 300)
        assert in_window <= 80
    assert grants[19] == 0.0 and grants[20] > 0  # a burst of 20, then one every 5 s
    assert bucket.max_in_window(300) == 80


async def test_a_drained_bucket_earns_its_next_token_first() -> None:
    time = VirtualTime()
    bucket = TokenBucket(capacity=5, rate=1.0, clock=time.clock, sleep=time.sleep)
    await bucket.acquire()
    bucket.drain()
    await bucket.acquire()
    assert time.now == 1.0


def test_results_say_when_nothing_more_is_to_be_asked() -> None:
    from relay365.tracing import TraceResult
    from relay365.tracing.model import TraceDetail

    wanted = TraceRequest("<a@b>", "c@d", NOW)
    graph = {
        "id": "t",
        "messageId": "<a@b>",
        "recipientAddress": "c@d",
        "receivedDateTime": "2026-01-21T14:12:34Z",
    }
    waiting = TraceResult(wanted, TraceRecord.from_graph({**graph, "status": "pending"}))
    done = TraceResult(
        wanted,
        TraceRecord.from_graph({**graph, "status": "quarantined"}),
        (TraceDetail.from_graph({"dateTime": "2026-01-21T14:12:35Z", "event": "Quarantine"}),),
    )
    assert not TraceResult(wanted, None).settled and not waiting.settled
    assert done.settled and TraceResult(wanted, None, expired=True).settled
    assert done.to_json()["record"]["status"] == "quarantined"
    assert done.to_json()["details"][0]["event"] == "Quarantine"


def test_the_trace_client_is_core() -> None:
    """relay365.tracing imports neither the sandbox nor the diagnostics (function-local imports too)."""
    import ast
    from pathlib import Path

    import relay365.tracing

    root = Path(relay365.tracing.__file__).parent
    imported: set[str] = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert "relay365.errors" in imported and "httpx" in imported  # it looked
    assert not [n for n in imported if n.startswith(("relay365.sandbox", "relay365.diagnostics"))]
