"""HTTP sessions for Label Studio and image hosts: one retry policy that never repeats a write
Label Studio may have committed (`LSRetry`), and credentials stripped on any redirect that leaves
the origin (`OriginSession`)."""
from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from backend.ls.auth import origin


class OriginSession(requests.Session):
    """A Session that drops the Authorization header on every redirect that leaves the origin.

    requests' own rule keeps it on an http -> https upgrade of the same host (default ports), a
    different origin; here any change of scheme, host or port strips it."""

    def should_strip_auth(self, old_url: str, new_url: str) -> bool:
        old = origin(old_url)
        return old is None or old != origin(new_url)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_MAX_S = 60


class LSRetry(Retry):
    """urllib3's Retry with the one policy for requests to Label Studio (and image hosts).

    * Every method is retried when the connection could not be made (urllib3 counts only those as
      connect errors: the request was never sent).
    * Idempotent methods (GET, PATCH, DELETE: a repeat changes nothing more) are also retried on a
      read error (read timeout, connection dropped) and on 429, 500, 502, 503, 504.
    * A POST (creating predictions, importing) is retried only when Label Studio refused it: 429,
      or 503 with Retry-After. Not on 502/504 or a read timeout: a proxy's 502/504 may come while
      LS goes on committing it, and a repeat would duplicate the predictions.
    * The wait is Retry-After when the answer has one (at most RETRY_AFTER_MAX_S), else
      exponential: the first retry at once, then backoff * 2, * 4, ...
    * TLS and other errors are not retried; a 401 is left to the caller (a PAT refresh).
    """

    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if method.upper() in self.allowed_methods:
            return super().is_retry(method, status_code, has_retry_after)
        return status_code == 429 or (status_code == 503 and has_retry_after)  # refused, not committed


def retrying_session(retries: int, backoff: float) -> requests.Session:
    """An OriginSession whose every request follows LSRetry, at most `retries` retries; the last
    answer is returned when they are spent (its status, not an exception)."""
    policy = LSRetry(total=retries, other=0, allowed_methods=IDEMPOTENT_METHODS, status_forcelist=RETRY_STATUSES,
                     backoff_factor=backoff, raise_on_status=False, retry_after_max=RETRY_AFTER_MAX_S)
    session = OriginSession()
    adapter = HTTPAdapter(max_retries=policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
