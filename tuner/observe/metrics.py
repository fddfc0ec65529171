"""Prometheus metrics while a job runs (`tuner run --metrics-port PORT`).

A `JobMetrics` lives in a registry of its own (never prometheus_client's global one) and is fed by
the event stream (`tuner.observe.events.listen`): the stages, the trainer's progress and the
checkpoints already tell what happened as events, so none of them knows about Prometheus. Under
torchrun only rank 0 serves (the CLI decides). The server runs in daemon threads, so it never keeps
the process alive, and an event a metric cannot be read from is skipped, never raised into the job.

    tuner_train_step, tuner_train_max_steps, tuner_train_epoch       the optimizer step, of how many
    tuner_train_loss, tuner_train_learning_rate, tuner_train_grad_norm at the last logging step
    tuner_tokens_per_second, tuner_train_eta_seconds                  likewise
    tuner_eval_loss{model="base"|"adapter"}                           the last evaluation's loss
    tuner_peak_memory_bytes{memory="gpu"|"rss"}                       the logged peak (0.01 GiB steps)
    tuner_stage_active{stage}                                         1 while the stage runs, else 0
    tuner_stage_duration_seconds{stage}                               each finished stage's time
    tuner_checkpoints_saved_total, tuner_checkpoint_save_duration_seconds,
    tuner_last_checkpoint_timestamp_seconds, tuner_checkpoint_age_seconds (at scrape time)
    tuner_events_total{type}                                          every event, by type
    process_*                                       prometheus_client's: live resident memory, CPU time

Every tuner_ series carries the labels workspace, preset and method. A series appears once its
first event came (no loss before the first logging step, no checkpoint age before a save; a loss
that was not a finite number is NaN). Before the server stops, the job waits up to
`TUNER_METRICS_FINAL_SCRAPE_SECONDS` (default 0) for one scrape that sees its last values.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tuner.errors import UserError
from tuner.observe import events

LABELS = ("workspace", "preset", "method")
DEFAULT_ADDRESS = "0.0.0.0"  # a pod is scraped on its IP
PATH = "/metrics"  # what the server answers on any path; the one the Job's annotations name
FINAL_SCRAPE_ENV = "TUNER_METRICS_FINAL_SCRAPE_SECONDS"
GIB = 2**30
# train.step metrics -> gauges (tuner.train.progress.ProgressEvents writes them)
_STEP_GAUGES = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch",
                "tokens_per_second": "tokens_per_second", "eta_seconds": "eta"}


class JobMetrics:
    """The job's metrics, updated by `observe(event)`; `registry` is what a scrape reads."""

    def __init__(self, *, workspace: str, preset: str, method: str, clock: Callable[[], float] = time.time):
        self.registry = CollectorRegistry()
        self.labels = {"workspace": workspace, "preset": preset, "method": method}
        self.clock = clock
        self.last_checkpoint: float | None = None  # when this run saved its last checkpoint (clock time)
        self._stages: set[str] = set()
        self._broken = False
        self._scrapes = threading.Condition()
        self._version = 0  # one more per event
        self._served = -1  # the version the last completely sent scrape showed

        def gauge(name: str, help: str, *extra: str) -> Gauge:
            return Gauge(name, help, [*LABELS, *extra], registry=self.registry)

        self.step = gauge("tuner_train_step", "The optimizer step training reached")
        self.max_steps = gauge("tuner_train_max_steps", "The optimizer steps training will take in all")
        self.epoch = gauge("tuner_train_epoch", "The epoch training reached (fractional)")
        self.loss = gauge("tuner_train_loss", "Training loss at the last logging step")
        self.learning_rate = gauge("tuner_train_learning_rate", "Learning rate at the last logging step")
        self.grad_norm = gauge("tuner_train_grad_norm", "Gradient norm at the last logging step")
        self.tokens_per_second = gauge("tuner_tokens_per_second", "Input tokens trained per second since this "
                                                                  "process started training")
        self.eta = gauge("tuner_train_eta_seconds", "Estimated seconds until training finishes")
        self.eval_loss = gauge("tuner_eval_loss", "Eval loss of the last evaluation (base: before training)", "model")
        self.memory = gauge("tuner_peak_memory_bytes", "Peak memory of the training process: allocated on its "
                                                       "GPU, else resident", "memory")
        self.stage_active = gauge("tuner_stage_active", "1 while the job's stage runs, 0 once it is done", "stage")
        self.stage_seconds = gauge("tuner_stage_duration_seconds", "How long each finished stage took", "stage")
        self.checkpoints = Counter("tuner_checkpoints_saved", "Checkpoints this run saved", LABELS,
                                   registry=self.registry)
        self.checkpoint_seconds = gauge("tuner_checkpoint_save_duration_seconds", "How long the last checkpoint "
                                                                                  "took to save")
        self.checkpoint_time = gauge("tuner_last_checkpoint_timestamp_seconds", "When this run saved its last "
                                                                                "checkpoint (Unix time)")
        self.logged = Counter("tuner_events", "Events the job logged, by type", [*LABELS, "type"],
                              registry=self.registry)
        self.registry.register(_CheckpointAge(self))
        ProcessCollector(registry=self.registry)

    def observe(self, event: dict[str, Any]) -> None:
        """Update the metrics from one event of tuner.observe.events (its listener: never raises)."""
        try:
            self._observe(event)
        except Exception as exc:  # a metric must never fail the job: say so once and keep training
            if not self._broken:
                self._broken = True
                sys.stderr.write(f"warning: metrics: skipped a {event.get('type')} event: {type(exc).__name__}: "
                                 f"{exc}\n")
        with self._scrapes:
            self._version += 1

    def _observe(self, event: dict[str, Any]) -> None:
        kind, step = event["type"], event.get("step")
        metrics, data = event.get("metrics") or {}, event.get("data") or {}
        self.logged.labels(**self.labels, type=kind).inc()
        if kind == "stage" and isinstance(data.get("name"), str):
            name = data["name"]
            for other in self._stages - {name}:  # one stage at a time: a new one ends any other
                self._set(self.stage_active, 0, stage=other)
            self._stages.add(name)
            self._set(self.stage_active, 1 if data.get("state") == "started" else 0, stage=name)
            self._set(self.stage_seconds, metrics.get("seconds"), stage=name)
        elif kind in ("train.started", "train.step"):
            self._set(self.step, step)
            self._set(self.max_steps, data.get("total_steps"))
            for key, attribute in _STEP_GAUGES.items():
                if key in metrics:
                    self._set(getattr(self, attribute), math.nan if metrics[key] is None else metrics[key])
            for key, value in metrics.items():  # gpu_memory_gib or rss_memory_gib
                if key.endswith("_memory_gib") and value is not None:
                    self._set(self.memory, value * GIB, memory=key.removesuffix("_memory_gib"))
        elif kind == "eval" and "eval_loss" in metrics:
            loss = metrics["eval_loss"]
            self._set(self.eval_loss, math.nan if loss is None else loss, model=data.get("model") or "adapter")
        elif kind == "checkpoint.saved":
            self.last_checkpoint = self.clock()
            self.checkpoints.labels(**self.labels).inc()
            self._set(self.checkpoint_time, self.last_checkpoint)
            self._set(self.checkpoint_seconds, metrics.get("seconds"))

    def _set(self, gauge: Gauge, value: Any, **extra: str) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            gauge.labels(**self.labels, **extra).set(value)

    def serve(self, port: int, address: str = DEFAULT_ADDRESS) -> ThreadingWSGIServer:
        """Start answering scrapes on `address:port` in daemon threads; UserError when the port is taken."""
        app = make_wsgi_app(self.registry)

        def scraped(environ, start_response):
            with self._scrapes:
                version = self._version
            body = app(environ, start_response)
            if environ.get("PATH_INFO") == "/favicon.ico":
                return body
            return _Sent(body, lambda: self._sent(version))

        try:
            server = make_server(address, port, scraped, ThreadingWSGIServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}", where="--metrics-port",
                            fix="choose a free port") from None
        threading.Thread(target=server.serve_forever, name="tuner-metrics", daemon=True).start()
        return server

    def _sent(self, version: int) -> None:
        with self._scrapes:
            self._served = max(self._served, version)
            self._scrapes.notify_all()

    def wait_for_scrape(self, seconds: float) -> bool:
        """Wait up to `seconds` for a scrape, completely sent, that saw every event so far."""
        with self._scrapes:
            version = self._version
            return self._scrapes.wait_for(lambda: self._served >= version, timeout=seconds)


class _CheckpointAge(Collector):
    """tuner_checkpoint_age_seconds, worked out when scraped."""

    def __init__(self, metrics: JobMetrics):
        self.metrics = metrics

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        if self.metrics.last_checkpoint is not None:
            family.add_metric(list(self.metrics.labels.values()), self.metrics.clock() - self.metrics.last_checkpoint)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("tuner_checkpoint_age_seconds", "Seconds since this run saved its last checkpoint",
                                 labels=LABELS)


class _Sent:
    """A WSGI response body that calls `done` once every byte of it was written to the socket."""

    def __init__(self, body, done: Callable[[], None]):
        self.body, self.done, self.complete = body, done, False

    def __iter__(self):
        yield from self.body
        self.complete = True  # wsgiref asks for more only after writing the last chunk

    def close(self) -> None:
        if hasattr(self.body, "close"):
            self.body.close()
        if self.complete:
            self.done()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # no access log lines in the job's log
        pass


def final_scrape_seconds() -> float:
    value = os.environ.get(FINAL_SCRAPE_ENV) or "0"
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"{FINAL_SCRAPE_ENV}={value!r} is not a number of seconds", fix="give 0 or more seconds")
    return seconds


@contextmanager
def serving(port: int, *, workspace: str, preset: str, method: str,
            address: str = DEFAULT_ADDRESS) -> Iterator[JobMetrics]:
    """Serve the job's metrics on `port` for the block, fed by every event logged in it.

    The port is bound here, so one in use is a UserError before any work. On the way out, however
    the block ends, it waits up to TUNER_METRICS_FINAL_SCRAPE_SECONDS for a scrape of the last values,
    then stops the server.
    """
    linger = final_scrape_seconds()
    metrics = JobMetrics(workspace=workspace, preset=preset, method=method)
    server = metrics.serve(port, address)
    stop_listening = events.listen(metrics.observe)
    try:
        yield metrics
    finally:
        try:
            metrics.wait_for_scrape(linger)
        finally:
            stop_listening()
            server.shutdown()
            server.server_close()
