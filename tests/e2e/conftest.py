"""Fixtures of the end-to-end tests: a real Label Studio 1.23.2 and our backend as subprocesses.

The tails of the logs of every Label Studio and of the test's own backend processes are appended
to the report of a failing test.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .ls_harness import LEGACY_TOKEN, Backend, LabelStudio, tail

_LS_LOGS: list[Path] = []
_TEST_LOGS = pytest.StashKey[list[Path]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for path in [*_LS_LOGS, *item.stash.get(_TEST_LOGS, [])]:
            report.sections.append((f"log {path.name} ({path})", tail(path, 150)))


@pytest.fixture(scope="session")
def label_studio_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], LabelStudio]]:
    """Start fresh Label Studio instances (each from a copy of the cached migrated data folder)."""
    started: list[LabelStudio] = []

    def start() -> LabelStudio:
        work = tmp_path_factory.mktemp("label-studio")
        _LS_LOGS.append(work / "logs" / "label-studio.log")
        ls = LabelStudio.start(work)
        started.append(ls)
        return ls

    yield start
    for ls in started:
        ls.stop()


@pytest.fixture(scope="session")
def label_studio(label_studio_factory: Callable[[], LabelStudio]) -> LabelStudio:
    """The shared instance, legacy tokens enabled (a test that changes org settings starts its own)."""
    return label_studio_factory()


@pytest.fixture
def start_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    """Start our backend (gunicorn web + one RQ worker on the real Redis, or `embedded`: the web
    process alone) against a Label Studio; `work` and `port` of an earlier one restart it."""
    started: list[Backend] = []
    logs = request.node.stash.setdefault(_TEST_LOGS, [])

    def start(ls: LabelStudio, api_key: str = LEGACY_TOKEN, basic_auth: tuple[str, str] | None = None,
              embedded: bool = False, work: Path | None = None, port: int | None = None) -> Backend:
        work = work or tmp_path / f"backend-{len(started)}"
        logs.extend(log for log in (work / "logs" / "backend-web.log", work / "logs" / "backend-worker.log")
                    if log not in logs)
        backend = Backend.start(work, ls.url, api_key, basic_auth=basic_auth, embedded=embedded, port=port)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()
