"""What the routes of one app share, kept on the app (app.extensions["ntt"]) instead of in closures."""
from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from backend import queueing
from backend.settings import Settings
from backend.web.metrics import Metrics
from backend.web.predict_wait import PredictWaiter


@dataclass
class WebState:
    """Settings, counters, the webhook spool (and its replayer with Redis), /predict's waiter."""

    settings: Settings
    metrics: Metrics
    spool: queueing.Spool
    replayer: queueing.SpoolReplayer | None
    waiter: PredictWaiter

    @classmethod
    def build(cls, settings: Settings) -> WebState:
        """The state of a new app; opens nothing (the replayer starts on the first request)."""
        metrics = Metrics()
        spool = queueing.Spool(settings.spool_dir)
        replayer = queueing.SpoolReplayer(spool, settings) if settings.redis_url else None
        waiter = PredictWaiter(settings.predict_waiting_calls, settings.predict_budget_s, metrics)
        return cls(settings, metrics, spool, replayer, waiter)


def web_state() -> WebState:
    """The state of the app serving the current request."""
    return current_app.extensions["ntt"]
