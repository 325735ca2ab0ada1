"""Parsers of environment values: each turns the raw string into the setting's type or raises
ValueError with a message the operator can act on (backend.settings names the variable)."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


def text(raw: str) -> str:
    return raw.strip()


def flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")


def number(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("expected a number") from None


def positive_int(raw: str) -> int:
    value = number(raw)  # accepts "40e6"
    if not (value > 0 and value.is_integer()):
        raise ValueError("expected a positive integer")
    return int(value)


def nonneg_float(raw: str) -> float:
    value = number(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a finite number >= 0")
    return value


def positive_float(raw: str) -> float:
    value = nonneg_float(raw)
    if value == 0:
        raise ValueError("expected a number > 0")
    return value


def unit_float(raw: str) -> float:
    value = number(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a number between 0 and 1")
    return value


def path(raw: str) -> Path:
    if not raw.strip():
        raise ValueError("expected a path")
    return Path(raw.strip()).expanduser()


def http_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http(s) URL such as http://label-studio:8080")
    return url


def redis_url(raw: str) -> str:
    url = raw.strip()
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected redis://host:port/db, rediss://… or unix://…")
    return url


def queue_prefix(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", value):
        raise ValueError("expected letters, digits, '_', '-', '.' or ':'")
    return value


def choice(options: Mapping[str, Any]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value
    return parse


def device(raw: str) -> str | None:
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
    return value


def hosts(raw: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())


def log_level(raw: str) -> str:
    value = raw.strip().upper()
    if not isinstance(logging.getLevelName(value), int):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value
