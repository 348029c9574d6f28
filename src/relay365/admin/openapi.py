"""The OpenAPI 3.1 document of the console's JSON API (``/api/openapi.json``), from one table."""

from __future__ import annotations

from typing import Any

from relay365 import __version__

_QUEUE_FILTERS = {
    "state": "open, queued, deferred, delivered, bounced or held",
    "device": "device name",
    "sender": "address, @domain or pattern with *; <> for the null sender",
    "recipient": "address, @domain or pattern with *",
    "transport": "transport of the last attempt",
    "min_age": "seconds, or 5m, 1h, 4h, 1d, 3d",
    "order": "newest (default) or oldest",
    "cursor": "next_cursor of the previous page",
    "limit": "1-500, default 50",
}
_TRACE_FILTERS = {
    "sender": "address, @domain or pattern with *",
    "recipient": "address, @domain or pattern with *",
    "subject": "substring",
    "message_id": "Message-ID, with or without <>",
    "queue_id": "queue id",
    "device": "device name",
    "transport": "transport name",
    "kind": "comma-separated event kinds (received, refused, routed, attempted, delivered, ..., "
    "m365_status, m365_event, m365_unresolved: Microsoft 365's message trace)",
    "since": "ISO 8601 time (UTC unless an offset is given) or Unix seconds",
    "until": "ISO 8601 time or Unix seconds",
    "before": "next_cursor of the previous page (newest first)",
    "limit": "1-1000, default 100",
}
_QID = {"queue_id": "queue id"}

# (method, path, summary, role, query parameters, path parameters)
ENDPOINTS: tuple[tuple[str, str, str, str, dict[str, str], dict[str, str]], ...] = (
    ("get", "/api/health", "Liveness: listeners, queue counts, held-back transports", "none", {}, {}),
    ("get", "/metrics", "Prometheus metrics (no login from loopback unless configured)", "viewer", {}, {}),
    (
        "get",
        "/api/overview",
        "Counts for the last hour and day, queue, transports, tokens, pacing, and per route what "
        "Microsoft 365 did with the mail it accepted (post_acceptance)",
        "viewer",
        {},
        {},
    ),
    ("get", "/api/queue", "Queued messages, filtered and paged", "viewer", _QUEUE_FILTERS, {}),
    ("post", "/api/queue/actions", "hold/release/retry/delete by ids or by filter", "operator", {}, {}),
    (
        "get",
        "/api/queue/{queue_id}",
        "One message: envelope, headers, recipients, trace (relay and Microsoft 365), and per recipient "
        "Microsoft 365's status, reason and advice (microsoft)",
        "viewer",
        {},
        _QID,
    ),
    ("get", "/api/queue/{queue_id}/raw", "The message as spooled (message/rfc822)", "operator", {}, _QID),
    ("post", "/api/queue/{queue_id}/hold", "Hold a message", "operator", {}, _QID),
    ("post", "/api/queue/{queue_id}/release", "Release a held message", "operator", {}, _QID),
    ("post", "/api/queue/{queue_id}/retry", "Try a message again now", "operator", {}, _QID),
    ("post", "/api/queue/{queue_id}/delete", "Delete a message (no DSN)", "operator", {}, _QID),
    (
        "get",
        "/api/trace",
        "Search the tracking log (message trace, Microsoft 365's side of it, audit log)",
        "viewer",
        _TRACE_FILTERS,
        {},
    ),
    ("get", "/api/trace.csv", "The same search as CSV (limit up to 100000)", "viewer", _TRACE_FILTERS, {}),
    (
        "get",
        "/api/devices",
        "Each device's last connection, TLS, messages today, last refusal",
        "viewer",
        {},
        {},
    ),
    ("get", "/api/setup/spf", "The SPF record to publish per sending domain", "viewer", {}, {}),
    ("post", "/api/setup/doctor", "Run the doctor now (probes the upstreams)", "operator", {}, {}),
    (
        "get",
        "/api/mailboxes",
        "The sandbox's mailboxes and messages (demo only)",
        "viewer",
        {"mailbox": "", "folder": ""},
        {},
    ),
    (
        "get",
        "/api/events",
        "Server-sent events: 'changed' when queue, trace or mailboxes change",
        "viewer",
        {},
        {},
    ),
)

_BULK_BODY = {
    "type": "object",
    "required": ["action"],
    "properties": {
        "action": {"enum": ["hold", "release", "retry", "delete"]},
        "ids": {"type": "array", "items": {"type": "string"}},
        "filter": {"type": "object", "properties": {k: {"type": "string"} for k in _QUEUE_FILTERS}},
    },
}


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary, role, query, path_params in ENDPOINTS:
        params = [
            {"name": n, "in": "query", "required": False, "description": d, "schema": {"type": "string"}}
            for n, d in query.items()
        ] + [
            {"name": n, "in": "path", "required": True, "description": d, "schema": {"type": "string"}}
            for n, d in path_params.items()
        ]
        op: dict[str, Any] = {
            "summary": summary,
            "description": f"Role needed: {role}.",
            "parameters": params,
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "A bad parameter; the error names it"},
                "401": {"description": "No session or token"},
                "403": {"description": "Role or CSRF token missing"},
            },
        }
        if role == "none":
            op["security"] = []
        if path == "/api/queue/actions":
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _BULK_BODY}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "relay365 admin API", "version": __version__},
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer", "description": "relay365 admin token create"},
                "session": {"type": "apiKey", "in": "cookie", "name": "relay365_session"},
            }
        },
        "security": [{"token": []}, {"session": []}],
        "paths": paths,
    }
