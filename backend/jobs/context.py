"""The services one job works with, gathered once when the job starts.

backend.runtime keeps the process-wide singletons; a job takes what it needs from there once, in a
JobContext, and hands that to its helpers. The engine, the proposal cache, the LS client and the
image fetcher are looked up on first use only, so building a context loads no model (the web
process schedules jobs; only workers run them).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from backend import queueing, runtime
from backend.settings import Settings
from backend.storage.bank_store import BankStore, Tuning
from backend.storage.store import Store
from backend.storage.tasks_registry import TaskRegistry

if TYPE_CHECKING:
    from backend.ls.images import ImageFetcher
    from backend.ls.ls_client import LabelStudioClient
    from backend.storage.proposal_cache import ProposalCache
    from model.engine import Engine


@dataclass
class JobContext:
    """One project's services for the length of one job."""

    pid: int
    settings: Settings
    store: Store
    banks: BankStore
    registry: TaskRegistry

    @classmethod
    def for_project(cls, pid: int) -> "JobContext":
        """The context of a job on project `pid`, from this process's singletons."""
        return cls(int(pid), runtime.get_settings(), runtime.get_store(), runtime.get_bank_store(),
                   runtime.get_registry())

    @cached_property
    def engine(self) -> "Engine":
        return runtime.get_engine()

    @cached_property
    def proposal_cache(self) -> "ProposalCache":
        return runtime.get_proposal_cache()

    @cached_property
    def ls_client(self) -> "LabelStudioClient":
        """REST client of the project's Label Studio (LabelStudioAPIError when none is configured)."""
        return runtime.get_ls_client(self.pid)

    @cached_property
    def fetcher(self) -> "ImageFetcher":
        return runtime.get_fetcher(self.pid)

    def tuning(self) -> Tuning:
        """The project's tuning in force now (an evaluation may change it while a job runs)."""
        return runtime.get_tuning(self.pid)

    def model_version(self, bank_version: str | None = None, tuning: Tuning | None = None) -> str:
        """The project's model_version (see backend.runtime.model_version)."""
        return runtime.model_version(self.pid, bank_version, tuning)


def progress(done: int, total: int | None, **fields: object) -> None:
    """Progress in the running job's meta (GET /jobs); a no-op outside a job."""
    queueing.update_meta(done=done, total=total, **fields)
