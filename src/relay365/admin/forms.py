"""HTML form bodies (``application/x-www-form-urlencoded``, the only kind the console's forms send),
read once per request and bounded in size; no multipart parser is needed or accepted."""

from __future__ import annotations

import urllib.parse

from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request

FORM_LIMIT = 1024 * 1024  # a queue form with 500 selected ids is ~15 KB


class FormError(ValueError):
    pass


async def form(request: Request) -> ImmutableMultiDict[str, str]:
    cached = getattr(request.state, "form", None)
    if isinstance(cached, ImmutableMultiDict):
        return cached
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        data: ImmutableMultiDict[str, str] = ImmutableMultiDict()
    else:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > FORM_LIMIT:
                raise FormError(f"form larger than {FORM_LIMIT} bytes")
        pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        data = ImmutableMultiDict(pairs)
    request.state.form = data
    return data
