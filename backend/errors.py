"""Errors the adapter layer raises, with messages an operator can act on.

Messages never contain API keys or tokens; URLs in messages go through `redact_url` so presigned
query strings and user:password parts do not end up in logs or in Label Studio's UI.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters that name a file rather than carry a credential (LS media routes).
_SAFE_QUERY_KEYS = frozenset({"d", "filepath", "fileuri"})


def redact_url(url: str) -> str:
    """`url` without user:password and with every query value except file names replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, v if k in _SAFE_QUERY_KEYS else "***")
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class BadRequest(Exception):
    """The request from Label Studio cannot be served as sent (the app answers HTTP 400)."""


class UnsupportedConfig(BadRequest):
    """The project's label config has nothing this backend can predict or learn from."""


_STATUS_HINTS = {
    401: "check LABEL_STUDIO_API_KEY (legacy token vs personal access token)",
    403: "check LABEL_STUDIO_API_KEY (legacy token vs personal access token) and its project access",
    404: "check LABEL_STUDIO_URL / file path",
}


class ImageError(Exception):
    """A task image could not be fetched or decoded.

    Attributes: url (redacted), status (HTTP status or None), reason (short cause), hint (what to
    check; derived from the status when not given).
    """

    def __init__(self, url: str, reason: str, *, status: int | None = None, hint: str | None = None):
        self.url = redact_url(url)
        self.status = status
        self.reason = reason
        self.hint = hint if hint is not None else _STATUS_HINTS.get(status or 0)
        message = f"cannot load image {self.url}: {reason}"
        if status is not None:
            message += f" (HTTP {status})"
        if self.hint:
            message += f"; {self.hint}"
        super().__init__(message)


class LabelStudioAPIError(Exception):
    """A call to the Label Studio REST API failed (status None: no HTTP answer at all)."""

    def __init__(self, message: str, *, status: int | None = None):
        self.status = status
        super().__init__(message if status is None else f"{message} (HTTP {status})")
