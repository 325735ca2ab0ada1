"""Every environment variable of the backend, read and validated in one place.

`Settings.from_env()` is called once per process (web, worker); a bad value stops the process at
start with a message naming the variable, instead of failing later inside a job. The README's
table comes from `env_table()`, i.e. from the `help` text of each field below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from backend import env_parsers as env
from model.catalog import DINO_MODELS, SAM_MODELS, checkpoint_filename
from model.options import MethodOptions

WEB_THREADS_FREE = 2  # web threads /predict never waits on: LS's /health (1 s timeout) and /setup (3 s)
# Matching variants an evaluation scores side by side (docs/method.md, "Variants"): name -> the
# MethodOptions fields it changes; "ntt" is the faithful method (the options as configured).
VARIANTS: dict[str, dict[str, str]] = {"ntt": {}, "graph": {"merge": "graph"}, "negatives": {"negatives": "suppress"}}


class SettingsError(ValueError):
    """A bad environment variable; the message names it."""


def _var(env: str, default: Any, help: str, parse: Callable[[str], Any] = env.text, *,
         aliases: tuple[str, ...] = (), secret: bool = False, default_doc: str | None = None) -> Any:
    """A dataclass field bound to an environment variable (and its aliases, tried in order)."""
    meta = {"env": env, "aliases": aliases, "help": help, "parse": parse, "secret": secret,
            "default_doc": default_doc}
    return field(default=default, metadata=meta)


def _option(option: str, env: str, help: str, parse: Callable[[str], Any]) -> Any:
    """A field overriding the MethodOptions field `option`: its default (and documented default)
    is the method's own value, and Settings.method_options() applies it."""
    default = getattr(MethodOptions(), option)
    doc = f"`{int(default)}`" if isinstance(default, bool) else f"`{default}`"
    f = _var(env, default, help, parse, default_doc=doc)
    return field(default=default, metadata={**f.metadata, "option": option})


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Process configuration. Secrets never appear in repr() (they are masked)."""

    label_studio_url: str | None = _var(
        "LABEL_STUDIO_URL", None, "Label Studio base URL reachable from this backend; used for image "
        "downloads and posting predictions (else the `hostname` sent by /setup).", env.http_url,
        aliases=("LABEL_STUDIO_HOST",), default_doc="unset")
    label_studio_api_key: str | None = _var(
        "LABEL_STUDIO_API_KEY", None, "Label Studio legacy token or personal access token (PAT), "
        "sent only to LABEL_STUDIO_URL's origin (scheme, host, port); else the `access_token` sent by "
        "/setup, sent only to the `hostname` that came with it.", aliases=("LABEL_STUDIO_ACCESS_TOKEN",),
        secret=True, default_doc="unset")
    basic_auth_user: str | None = _var(
        "BASIC_AUTH_USER", None, "HTTP Basic auth user required on every route (with BASIC_AUTH_PASS).",
        default_doc="unset")
    basic_auth_pass: str | None = _var(
        "BASIC_AUTH_PASS", None, "HTTP Basic auth password.", secret=True, default_doc="unset")
    model_dir: Path = _var(
        "MODEL_DIR", Path("./data"),
        "Backend state: checkpoints, the embedded store and queue (`state/`), webhook spool.",
        env.path, default_doc="`./data`")
    cache_dir: Path | None = _var(
        "CACHE_DIR", None, "Image and proposal caches (local disk shared by the workers of one host).",
        env.path, default_doc="`$MODEL_DIR/cache`")
    redis_url: str | None = _var(
        "REDIS_URL", None, "Redis for the bank store and RQ queues; unset = embedded in-process worker "
        "thread (single process, nothing shared).", env.redis_url, secret=True, default_doc="unset")
    queue_prefix: str = _var(
        "NTT_QUEUE_PREFIX", "ntt", "Prefix of the RQ queue names (`<prefix>-interactive`, `<prefix>-bank`, "
        "`<prefix>-predict`); lets several deployments share one Redis.", env.queue_prefix, default_doc="`ntt`")
    sam_model: str = _var(
        "NTT_SAM_MODEL", "sam2-l", f"SAM2 model ({', '.join(SAM_MODELS)}).", env.choice(SAM_MODELS),
        default_doc="`sam2-l`")
    dino_model: str = _var(
        "NTT_DINO_MODEL", "dinov2-l", f"DINOv2 model ({', '.join(DINO_MODELS)}).", env.choice(DINO_MODELS),
        default_doc="`dinov2-l`")
    sam_checkpoint: Path | None = _var(
        "NTT_SAM_CHECKPOINT", None, "SAM2 checkpoint file (official Meta .pt).", env.path,
        default_doc="`$MODEL_DIR/checkpoints/<official file name>`")
    dino_checkpoint: Path | None = _var(
        "NTT_DINO_CHECKPOINT", None, "DINOv2 checkpoint file (official Meta .pth).", env.path,
        default_doc="`$MODEL_DIR/checkpoints/<official file name>`")
    random_weights: bool = _var(
        "NTT_RANDOM_WEIGHTS", False, "Build the models with random weights (tests and benchmarks only; "
        "predictions are meaningless).", env.flag, default_doc="`0`")
    device: str | None = _var(
        "NTT_DEVICE", None, "Torch device of the workers: auto, cpu, cuda, cuda:N, mps.", env.device,
        default_doc="`auto` (CUDA if present)")
    sam_image_size: int = _option(
        "sam_image_size", "NTT_SAM_IMAGE_SIZE", "SAM2 input side (the method's value).", env.positive_int)
    dino_image_size: int = _option(
        "dino_image_size", "NTT_DINO_IMAGE_SIZE", "DINOv2 input side (the method's value).", env.positive_int)
    points_per_side: int = _option(
        "points_per_side", "NTT_POINTS_PER_SIDE", "SAM2 point grid side (the method's value).", env.positive_int)
    point_batch_size: int = _option(
        "point_batch_size", "NTT_POINT_BATCH", "Prompts per SAM2 decoder call (a named deviation: the "
        "reference decodes 256 at a time; other sizes change results at float-rounding level).", env.positive_int)
    bf16: bool = _option(
        "bf16", "NTT_BF16", "bf16 autocast of the encoders and the SAM2 decoder on CUDA (deviation from "
        "the fp32 reference).", env.flag)
    compile_decoder: bool = _option(
        "compile_decoder", "NTT_COMPILE_DECODER", "torch.compile the SAM2 mask decoder (the cold path's "
        "largest stage), within the method's tolerances of eager fp32; an RQ worker compiles it at start, "
        "the embedded default on its first prediction; eager when compiling fails.", env.flag)
    variant: str = _var(
        "NTT_VARIANT", "auto", "Matching variant: `auto` uses the one with the best mean AP in the project's "
        f"last evaluation once it has enough evidence (else the faithful method), or pin one of "
        f"{', '.join(VARIANTS)} (`ntt` = the faithful method).", env.choice({"auto": None, **VARIANTS}),
        default_doc="`auto`")
    score_threshold: float = _var(
        "SCORE_THRESHOLD", 0.5, "Minimum region score in pre-annotations (the method itself has none); "
        "a control's `model_score_threshold` attribute overrides it.", env.unit_float, default_doc="`0.5`")
    max_detections: int = _var(
        "MAX_DETECTIONS", 100, "Maximum regions per task, cut from the method's top 100 detections "
        "(`model_max_detections` attribute overrides).",
        env.positive_int, default_doc="`100`")
    polygon_tolerance: float = _var(
        "POLYGON_TOLERANCE", 1.5, "Polygon simplification tolerance in pixels "
        "(`model_polygon_tolerance` attribute overrides).", env.nonneg_float, default_doc="`1.5`")
    ls_post_concurrency: int = _var(
        "LS_POST_CONCURRENCY", 4, "Predictions a job posts to Label Studio at once (a refresh of many "
        "tasks is mostly waiting on LS's answers).", env.positive_int, default_doc="`4`")
    refresh_threads: int = _var(
        "REFRESH_THREADS", min(8, os.cpu_count() or 1), "Cached tasks a refresh re-scores at once (threads of "
        "the worker; re-scoring is CPU work: cache read, re-match, region conversion).", env.positive_int,
        default_doc="CPU cores, at most 8")
    ls_bulk_refresh: bool = _var(
        "LS_BULK_REFRESH", True, "A refresh of 20+ cached tasks replaces our predictions in bulk (import "
        "requests of up to 1,000 predictions, then our old model versions deleted) instead of one PATCH "
        "per task, when every prediction of those versions belongs to a re-posted task (projects of up to "
        "20,000 predictions).", env.flag,
        default_doc="`1`")
    web_threads: int = _var(
        "WEB_THREADS", 8, "Threads of the gunicorn web process (backend/web/gunicorn_conf.py), one per request "
        "in progress. /predict calls wait for results on at most WEB_THREADS - 2 of them, so /health and "
        "/setup always find one free; further concurrent calls answer at once and the workers post their "
        "predictions to Label Studio.", env.positive_int, default_doc="`8`")
    predict_budget_s: float = _var(
        "PREDICT_BUDGET_S", 80.0, "Time /predict waits for results; later ones are posted to Label "
        "Studio by the workers. Keep it under LS's ML_TIMEOUT_PREDICT (100 s).", env.positive_float,
        default_doc="`80`")
    worker_heartbeat_s: float = _var(
        "WORKER_HEARTBEAT_S", 10.0, "RQ worker heartbeat while a job runs; a job whose worker died is "
        "requeued by the next worker after ~3 missed beats.", env.positive_float, default_doc="`10`")
    job_timeout_s: int = _var(
        "JOB_TIMEOUT_S", 3600, "Hard limit of one queued job (START_TRAINING batch jobs get 24 h).",
        env.positive_int, default_doc="`3600`")
    image_cache_mb: int = _var(
        "IMAGE_CACHE_MB", 2048, "Size bound of the on-disk image cache.", env.positive_int,
        default_doc="`2048`")
    proposal_cache_mb: int = _var(
        "PROPOSAL_CACHE_MB", 4096, "Size bound of the on-disk proposal cache (SAM2 masks + DINOv2 "
        "descriptors per image, and the full-resolution masks matches upsampled from them).", env.positive_int,
        default_doc="`4096`")
    max_image_pixels: int = _var(
        "MAX_IMAGE_PIXELS", 40_000_000, "Larger images are refused (per-task error).", env.positive_int,
        default_doc="`40000000`")
    max_image_bytes: int = _var(
        "MAX_IMAGE_BYTES", 64 * 2**20, "Larger image downloads are refused (per-task error).",
        env.positive_int, default_doc="`67108864`")
    max_request_mb: float = _var(
        "MAX_REQUEST_MB", 64.0, "Larger request bodies get 413.", env.positive_float, default_doc="`64`")
    local_files_document_root: Path | None = _var(
        "LOCAL_FILES_DOCUMENT_ROOT", None, "Read `/data/local-files/?d=…` images from this folder "
        "directly (same as LS's); paths cannot escape it.", env.path,
        aliases=("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",), default_doc="unset (download from LS)")
    allowed_image_hosts: tuple[str, ...] = _var(
        "ALLOWED_IMAGE_HOSTS", (), "Comma-separated extra hosts images may be downloaded from, `*` = "
        "any (Label Studio's origin is always allowed; credentials are only sent to it).", env.hosts,
        default_doc="empty")
    allow_link_local_image_hosts: bool = _var(
        "ALLOW_LINK_LOCAL_IMAGE_HOSTS", False, "Allow image downloads from link-local and cloud metadata "
        "addresses (169.254.0.0/16 incl. 169.254.169.254, fe80::/10, fd00:ec2::254, 100.100.100.200, "
        "metadata.google.internal), refused by default even with `ALLOWED_IMAGE_HOSTS=*`.", env.flag,
        default_doc="`0`")
    log_level: str = _var(
        "LOG_LEVEL", "INFO", "Python log level.", env.log_level, default_doc="`INFO`")

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read and validate every variable; raise SettingsError naming the first bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            for name in (meta["env"], *meta["aliases"]):
                raw = env.get(name)
                if raw is None or not raw.strip():  # empty (e.g. `BASIC_AUTH_USER=` in compose) = unset
                    continue
                try:
                    values[f.name] = meta["parse"](raw)
                except (ValueError, TypeError) as exc:
                    shown = _mask(raw) if meta["secret"] else repr(raw)
                    raise SettingsError(f"Invalid {name}={shown}: {exc}") from None
                break
        return cls(**values)._resolved()

    def _resolved(self) -> "Settings":
        """Fill defaults that depend on other variables."""
        if (self.basic_auth_user is None) != (self.basic_auth_pass is None):
            raise SettingsError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        ckpt = self.model_dir / "checkpoints"
        return replace(
            self,
            cache_dir=self.cache_dir or self.model_dir / "cache",
            sam_checkpoint=self.sam_checkpoint or ckpt / checkpoint_filename(self.sam_model),
            dino_checkpoint=self.dino_checkpoint or ckpt / checkpoint_filename(self.dino_model),
        )

    # ----------------------------------------------------------------------------------- derived
    @property
    def spool_dir(self) -> Path:
        """Webhooks received while Redis was down wait here (see backend.web.app)."""
        return self.model_dir / "spool"

    @property
    def predict_waiting_calls(self) -> int:
        """/predict calls that may hold a web thread waiting for results: all threads but the
        WEB_THREADS_FREE kept for /health and /setup."""
        return max(0, self.web_threads - WEB_THREADS_FREE)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user is not None and self.basic_auth_pass is not None)

    def queue_name(self, queue: str) -> str:
        """Full RQ queue name of a logical queue (one of backend.queueing.QUEUES)."""
        return f"{self.queue_prefix}-{queue}"

    def variant_options(self, name: str) -> MethodOptions | None:
        """The MethodOptions of a named variant (None for "ntt": the engine's own options)."""
        changes = VARIANTS[name]
        return replace(self.method_options(), **changes) if changes else None

    def method_options(self) -> MethodOptions:
        """MethodOptions with the NTT_* overrides (fields made by `_option`) applied."""
        return replace(MethodOptions(), **{f.metadata["option"]: getattr(self, f.name)
                                           for f in fields(self) if "option" in f.metadata})

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown.append(f"{f.name}={_mask(value) if f.metadata['secret'] else repr(value)}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__


def _mask(value: Any) -> str:
    """Secrets as '***'; a URL keeps everything but its password (redis://:***@host:6379/0)."""
    if value is None:
        return "None"
    parts = urlsplit(str(value))
    if parts.scheme and parts.netloc:
        if parts.password is None:
            return repr(str(value))
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return repr(parts._replace(netloc=netloc).geturl())
    return "'***'"


def env_table() -> str:
    """Markdown table of every variable (README)."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for f in fields(Settings):
        meta = f.metadata
        name = " / ".join(f"`{n}`" for n in (meta["env"], *meta["aliases"]))
        rows.append(f"| {name} | {meta['default_doc']} | {meta['help']} |")
    return "\n".join(rows)
