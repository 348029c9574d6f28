"""What an SMTP session reports to the tracking log and the device activity (the console's Message
trace and Devices pages): a refusal at the door, a message received, a device seen. Kept out of
``server.py`` so the session code only says *that* something happened."""

from __future__ import annotations

import asyncio

from relay365.observability.activity import DeviceActivity
from relay365.observability.tracking import EventKind, TrackingEvent, TrackingLog
from relay365.spool.model import Envelope

ADDRESS_LIMIT = 320  # RFC 5321 4.5.3.1: 64 octets local part + @ + 255 octets domain


def tls_version(transport: asyncio.BaseTransport | None) -> str:
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return str(ssl_object.version() or "") if ssl_object is not None else ""


def refused(
    tracking: TrackingLog,
    activity: DeviceActivity,
    reply: str,
    *,
    device: str | None,
    peer: str,
    listener: str,
    sender: str,
    recipient: str,
    tls: str,
) -> None:
    """A 4xx/5xx answered to a device: ``recipient`` is the RCPT argument being answered, or every
    recipient of the transaction (a refusal at DATA)."""
    activity.refused(device, address=peer, reply=reply)
    tracking.record(
        TrackingEvent(
            kind=EventKind.REFUSED,
            at=activity.now(),
            sender=sender,
            recipient=recipient.strip().split(" ")[0].strip("<>")[:ADDRESS_LIMIT],
            device=device or "",
            peer=peer,
            listener=listener,
            reply=reply.strip(),
            detail=tls,
        )
    )


def received(
    tracking: TrackingLog, activity: DeviceActivity, queue_id: str, envelope: Envelope, *, detail: str
) -> None:
    """A message queued and acknowledged: one event per recipient (the trace searches recipients)."""
    activity.accepted(envelope.device, address=envelope.peer)
    now = activity.now()
    for rcpt in envelope.rcpt_tos:
        tracking.record(
            TrackingEvent(
                kind=EventKind.RECEIVED,
                at=now,
                queue_id=queue_id,
                message_id=envelope.message_id,
                subject=envelope.subject,
                sender=envelope.mail_from,
                recipient=rcpt,
                device=envelope.device,
                peer=envelope.peer,
                listener=envelope.listener,
                detail=detail,
            )
        )
