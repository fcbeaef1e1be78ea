"""Wiring and lifecycle: connect, declare, consume; health and metrics on HTTP; stop on signals."""

import asyncio
import gc
import logging
import os
import resource
import signal
import time

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiohttp import web
from opentelemetry.trace import Tracer, TracerProvider

from worker import tracing
from worker.broker import topology
from worker.broker.activity import ActivityLog
from worker.broker.connect import BROKER_ERRORS, connect
from worker.broker.consumer import Consumer
from worker.broker.decision import Limits, Trust
from worker.broker.fence import StreamFence
from worker.broker.observers import Activity
from worker.broker.publisher import Publisher
from worker.broker.returns import Returns
from worker.channels import CHANNELS
from worker.channels.templates import Templates, sms_cost
from worker.channels.wiring import Needs
from worker.config import Settings
from worker.errors import CredentialsRefused
from worker.flows import Flows
from worker.http import Served
from worker.metrics import Metrics
from worker.ports import Channel
from worker.queues import Names
from worker.seam import SeamClient
from worker.stays import StayTimes

log = logging.getLogger("worker.service")

CHECK_BACKOFF_CAP = 60.0
TOPOLOGY_CHECK_CAP = 10.0  # seconds between looks for a topology not declared yet, at most
TOPOLOGY_TOLD_EVERY = 60.0  # seconds between the lines saying it is still missing
CLOSE_TIMEOUT = 5.0  # closing a connection to a broker that is gone must not hang the stop


def open_files_for(prefetch: int) -> None:
    """Two pools of up to ``prefetch`` connections (Seam, Twilio) and the rest (broker, SMTP,
    HTTP, files): raise the soft limit of open files to fit, up to the hard limit (a soft limit
    of 1024 is common; the pools alone could pass it at the default prefetch)."""
    wanted = 2 * prefetch + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "open files limited to %d; IKW_PREFETCH %d may want %d (raise ulimit -n)",
            target,
            prefetch,
            wanted,
        )


class StartError(Exception):
    """The worker cannot start; the message says what to fix, in one line."""


def load_templates(settings: Settings) -> Templates:
    """The guest's words as the settings name them (compiled once, by ``config.load``);
    StartError, a line per problem, if unusable."""
    if settings.templates is not None:
        return settings.templates
    problems: list[str] = []
    settings.compile(problems)
    if settings.templates is None:
        raise StartError("\n".join(problems))
    return settings.templates


def build_channels(settings: Settings, tracer: Tracer | None = None) -> dict[str, Channel]:
    """The configured channels, each built by its own wiring (worker/channels)."""
    templates = load_templates(settings)
    if "sms" in settings.channels:
        for line in sms_cost(templates):  # sent all the same; each extra segment is billed
            log.warning("SMS over one GSM-7 segment: %s", line)
    needs = Needs(templates, settings.prefetch, tracer)
    return {
        wiring.name: wiring.build(settings.channels[wiring.name], needs)
        for wiring in CHANNELS
        if wiring.name in settings.channels
    }


class Service:
    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
        """``tracer_provider``: where spans go; by default the global one (no-op unless ``ikw run``
        set up tracing from OTEL_*)."""
        self.settings = settings
        self.tracer = tracing.tracer(tracer_provider)
        self.names = Names(settings.namespace)
        self.metrics = Metrics()
        # IKW_PREFETCH sizes everything: a message makes one HTTP call at a time, so one
        # connection per message in flight, to Seam and to Twilio; a smaller pool would queue.
        self.seam = SeamClient(
            settings.seam_endpoint,
            settings.seam_api_key,
            connections=settings.prefetch,
            tracer=self.tracer,
        )
        self.channels = build_channels(settings, self.tracer)
        self.connection: AbstractRobustConnection | None = None
        self.consumer: Consumer | None = None
        self.fence: StreamFence | None = None
        self.activity: ActivityLog | None = None
        self.http: Served | None = None
        self.stopping = asyncio.Event()
        self._guard: asyncio.Task[None] | None = None
        self._recording: asyncio.Task[None] | None = None
        self._connected = True
        self.returns = Returns()
        self._paused_by = ""
        self._missing = ""  # what of the topology is not there yet (IKW_DECLARE=false)
        self._channels: list[AbstractChannel] = []
        self.metrics.ready.set_function(lambda: float(self.ready))

    @property
    def not_ready_because(self) -> str | None:
        """Why the worker is not taking messages now, or None when it is."""
        if self.stopping.is_set():
            return "stopping"
        if self.connection is None or self.connection.is_closed:
            return "not connected to RabbitMQ"
        if self._missing:
            return f"waiting for the topology: {self._missing} is missing; run `ikw topology`"
        if self.fence is None or not self.fence.caught_up.is_set():
            read = f": {self.fence.progress}" if self.fence else ""
            return f"catching up with the revocation fence{read}"
        if self._paused_by:
            return f"paused: {self._paused_by} refuses our credentials"
        if self.consumer is None or not self.consumer.consuming:
            return "not consuming yet"
        return None

    @property
    def ready(self) -> bool:
        return self.not_ready_because is None

    async def start(self) -> None:
        open_files_for(self.settings.prefetch)
        await self._serve_http()
        self.connection = await connect(self.settings.amqp_url)
        self.connection.close_callbacks.add(self._connection_lost)
        self.connection.reconnect_callbacks.add(self._reconnected)
        # Consuming and publishing on separate channels: publisher flow control never holds
        # acks back. aio-pika keeps channels weakly: these references keep them restorable.
        consuming = await self.connection.channel()
        await consuming.set_qos(prefetch_count=self.settings.prefetch)
        publishing = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        following = await self.connection.channel()
        recording = await self.connection.channel(publisher_confirms=False)
        self._channels = [consuming, publishing, following, recording]
        await self._topology()
        if self.stopping.is_set():  # stopped while waiting for the topology
            return
        publisher = Publisher(publishing, self.names, self.settings.broker_user, tracer=self.tracer)
        self.fence = StreamFence(
            self.names, publisher, self.settings.broker_user, self.settings.revoke_retention
        )
        self.returns.follow(self.fence)
        self.metrics.follow(self.fence)
        await self.fence.start(following)
        self.consumer = self._consumer(consuming, publisher, self.fence)
        if await self._exists(self.names.activity):
            self.activity = ActivityLog(recording, self.names.activity, self.settings.broker_user)
            self.activity.start()
            self.consumer.observers.append(Activity(self.activity.record))
        else:
            log.warning(
                "no stream %s: nothing is recorded for `ikw activity`; run `ikw topology`",
                self.names.activity,
            )
        consuming.close_callbacks.add(self.consumer.lost)
        self._recording = asyncio.create_task(self.returns.record(self.fence.append))
        assert self.http is not None
        log.info(
            "worker started",
            extra={
                "ctx": {
                    "namespace": self.settings.namespace,
                    "channels": sorted(self.channels),
                    "http": self.http.url,
                    "prefetch": self.settings.prefetch,
                }
            },
        )
        self._guard = asyncio.create_task(self._wait_for_credentials(None))

    async def _serve_http(self) -> None:
        self.http = Served(self._http_app())
        try:
            await self.http.start("0.0.0.0", self.settings.http_port)
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else type(exc).__name__
            raise StartError(
                f"cannot serve health and metrics on port {self.settings.http_port} ({why}); "
                "free it or set IKW_HTTP_PORT"
            ) from None

    async def _topology(self) -> None:
        """Declare it (IKW_DECLARE), else wait until what the worker uses is there."""
        assert self.connection is not None
        if not self.settings.declare:
            await self._wait_for_topology()
            return
        # On a channel of its own, closed after: a robust channel would declare the whole
        # topology again at every reopen, and one queue without a leader failed it all.
        declaring = await self.connection.channel()
        await topology.declare(
            declaring,
            self.names,
            self.settings.revoke_retention,
            self.settings.quorum_size,
            activity_retention=self.settings.activity_retention,
        )
        await declaring.close()

    def _consumer(
        self, consuming: AbstractChannel, publisher: Publisher, fence: StreamFence
    ) -> Consumer:
        flows = Flows(
            self.seam,
            self.channels,
            publisher,
            fence,
            publisher,
            min_key_lifetime=self.settings.min_key_lifetime,
            revoke_retention=self.settings.revoke_retention,
            stay_times=StayTimes(
                delivery_lead=self.settings.delivery_lead,
                checkout_grace=self.settings.checkout_grace,
                renew_before=self.settings.renew_before,
            ),
        )
        return Consumer(
            consuming,
            publisher,
            self.names,
            flows,
            self.metrics,
            limits=Limits(
                self.settings.max_attempts,
                self.settings.max_retry_age,
                self.settings.max_clock_skew,
            ),
            trust=Trust(self.settings.broker_user, self.settings.trusted_publishers),
            deadline=self.settings.message_deadline,
            on_credentials_refused=self._credentials_refused,
            returns=self.returns,
            tracer=self.tracer,
        )

    def _connection_lost(self, *_: object) -> None:
        if self.fence is not None:
            self.fence.caught_up.clear()  # revokes may be recorded meanwhile: read them first
        # aio-pika calls this for every failed attempt too (a node still down): said once a loss.
        if not self.stopping.is_set() and self._connected:
            self._connected = False
            self.metrics.reconnects.inc()
            log.warning("lost the connection to RabbitMQ; reconnecting")

    def _reconnected(self, *_: object) -> None:
        self._connected = True
        # The fence reads on by itself once its channel is back (StreamFence._reopened).
        log.info("reconnected to RabbitMQ")

    def _credentials_refused(self, exc: CredentialsRefused) -> None:
        if self._guard is None or self._guard.done():
            self._guard = asyncio.create_task(self._wait_for_credentials(exc))

    async def _wait_for_credentials(self, exc: CredentialsRefused | None) -> None:
        """Consume only while every configured service accepts our credentials."""
        assert self.consumer is not None
        if exc is not None:
            self._paused_by = exc.service
            self.metrics.refused(exc.service)
            await self.consumer.pause()
        delay, refused = 1.0, False
        while not self.stopping.is_set():
            try:
                await self._check_credentials()
                break
            except CredentialsRefused as error:
                log.error(
                    "%s %s our credentials: not taking messages; checking again in %.0f s",
                    error.service,
                    "still refuses" if refused else "refused",
                    delay,
                )
                refused = True
                self._paused_by = error.service
                self.metrics.refused(error.service)
            delay = await self._rest(delay, CHECK_BACKOFF_CAP)
        self._paused_by = ""
        self.metrics.refused("")
        if not self.stopping.is_set():
            await self.consumer.resume()
            log.info("credentials accepted again: consuming" if refused else "consuming")

    async def _check_credentials(self) -> None:
        """Raise CredentialsRefused if any service refuses us; other failures do not block."""
        for name, check in [("seam", self.seam.check)] + [
            (name, channel.check) for name, channel in self.channels.items()
        ]:
            try:
                await check()
            except CredentialsRefused:
                raise
            except Exception as error:
                log.warning("could not check the %s credentials (%s)", name, type(error).__name__)

    async def stop(self) -> None:
        """Two phases: stop taking messages and drain in-flight ones, then close everything."""
        self.stopping.set()
        if self._guard:
            await asyncio.gather(self._guard, return_exceptions=True)
        if self.fence:
            self.fence.stop()
        if self.consumer:
            cancelled = await self.consumer.stop(self.settings.shutdown_grace.total_seconds())
            if cancelled:
                log.warning("%d messages left unfinished; the broker requeues them", cancelled)
        if self.activity:
            await self.activity.stop(CLOSE_TIMEOUT)
        if self._recording and self.fence:
            self._recording.cancel()
            try:  # the replicas that take them over must not count them as crashes
                await asyncio.wait_for(self.returns.flush(self.fence.append), CLOSE_TIMEOUT)
            except (TimeoutError, *BROKER_ERRORS):
                log.warning("could not record the messages given back")
        if self.connection:
            try:
                await asyncio.wait_for(self.connection.close(), CLOSE_TIMEOUT)
            except (TimeoutError, *BROKER_ERRORS):
                log.warning("RabbitMQ did not answer the close; leaving the connection")
        await self.seam.close()
        for channel in self.channels.values():
            await channel.close()
        if self.http:
            await self.http.stop()
        log.info("worker stopped")

    async def _wait_for_topology(self) -> None:
        """IKW_DECLARE=false: unready until every exchange and queue the worker uses exists (in
        Kubernetes, the Job running `ikw topology` and the workers start together). Said in one
        line, again each TOPOLOGY_TOLD_EVERY while still missing."""
        delay, told = 1.0, 0.0
        while not self.stopping.is_set():
            self._missing = await self._first_missing() or ""
            if not self._missing:
                if told:
                    log.info("topology found: starting")
                return
            if not told or time.monotonic() - told >= TOPOLOGY_TOLD_EVERY:
                log.warning(
                    "%s is missing in namespace %s: run `ikw topology` (IKW_DECLARE=false: this "
                    "worker does not declare it); checking again until it is there",
                    self._missing,
                    self.settings.namespace,
                )
                told = time.monotonic()
            delay = await self._rest(delay, TOPOLOGY_CHECK_CAP)

    async def _first_missing(self) -> str | None:
        """On a channel of its own: a passive declare of something missing closes it."""
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            return await topology.first_missing(channel, self.names)
        finally:
            await channel.close()

    async def _rest(self, delay: float, cap: float) -> float:
        """Wait ``delay`` seconds, or less if the worker stops; the next delay, doubled."""
        try:
            await asyncio.wait_for(self.stopping.wait(), delay)
        except TimeoutError:
            pass
        return min(delay * 2, cap)

    async def _exists(self, name: str) -> bool:
        """A passive declare of a queue on a channel of its own."""
        assert self.connection is not None
        channel = await self.connection.channel()
        try:
            await channel.get_queue(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        tune_gc()
        await self.stopping.wait()
        await self.stop()

    def _http_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def readyz(_: web.Request) -> web.Response:
            why = self.not_ready_because
            body = {"ready": why is None} | ({"why": why} if why else {})
            return web.json_response(body, status=200 if why is None else 503)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app


# Python's collector on its defaults (a young collection every 700 allocations, and full ones
# that scan everything the process made at start) took a quarter of the worker's CPU at 400
# grants/s (bench/README, "The collector"). What start-up made lives as long as the process:
# frozen, it is never scanned again; young collections run every 50,000 allocations instead.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    gc.collect()  # start-up's garbage goes first: frozen, it would stay for good
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
