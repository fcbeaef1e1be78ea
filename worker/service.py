"""Wiring and lifecycle: connect, declare, consume; health and metrics on HTTP; stop on signals."""

import asyncio
import logging
import signal
from datetime import timedelta

from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from worker.broker import topology
from worker.broker.connect import connect
from worker.broker.consumer import Consumer
from worker.broker.publisher import Publisher
from worker.broker.topology import Names
from worker.channels import EmailChannel, SmsChannel
from worker.config import Settings
from worker.errors import CredentialsRefused
from worker.flows import Flows
from worker.metrics import Metrics
from worker.ports import Channel
from worker.sandbox.http import Served
from worker.seam import SeamClient

log = logging.getLogger("worker.service")

CHECK_BACKOFF_CAP = 60.0


def build_channels(settings: Settings) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    if settings.sms:
        s = settings.sms
        channels["sms"] = SmsChannel(
            s.account_sid,
            s.auth_token,
            from_=s.from_,
            messaging_service_sid=s.messaging_service_sid,
            api_url=s.api_url,
        )
    if settings.email:
        e = settings.email
        channels["email"] = EmailChannel(
            e.host,
            e.port,
            sender=e.sender,
            username=e.username,
            password=e.password,
            tls=e.tls,
            cert_bundle=e.ca_file,
        )
    return channels


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.metrics = Metrics()
        self.seam = SeamClient(settings.seam_endpoint, settings.seam_api_key)
        self.channels = build_channels(settings)
        self.connection: AbstractRobustConnection | None = None
        self.consumer: Consumer | None = None
        self.http: Served | None = None
        self.stopping = asyncio.Event()
        self._guard: asyncio.Task[None] | None = None
        self.metrics.ready.set_function(lambda: float(self.ready))

    @property
    def ready(self) -> bool:
        return bool(
            self.consumer
            and self.consumer.consuming
            and self.connection
            and not self.connection.is_closed
            and not self.stopping.is_set()
        )

    async def start(self) -> None:
        self.connection = await connect(self.settings.amqp_url)
        self.connection.close_callbacks.add(self._connection_lost)
        self.connection.reconnect_callbacks.add(self._reconnected)
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        await topology.declare(channel, self.names)
        publisher = Publisher(channel, self.names)
        flows = Flows(
            self.seam,
            self.channels,
            publisher,
            min_key_lifetime=timedelta(seconds=self.settings.min_key_lifetime),
        )
        self.consumer = Consumer(
            channel,
            publisher,
            self.names,
            flows,
            self.metrics,
            max_attempts=self.settings.max_attempts,
            max_retry_age=self.settings.max_retry_age,
            on_credentials_refused=self._credentials_refused,
        )
        self.http = Served(self._http_app())
        await self.http.start("0.0.0.0", self.settings.http_port)
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

    def _connection_lost(self, *_: object) -> None:
        if not self.stopping.is_set():
            log.warning("lost the connection to RabbitMQ; reconnecting")

    def _reconnected(self, *_: object) -> None:
        log.info("reconnected to RabbitMQ")

    def _credentials_refused(self, exc: CredentialsRefused) -> None:
        if self._guard is None or self._guard.done():
            self._guard = asyncio.create_task(self._wait_for_credentials(exc))

    async def _wait_for_credentials(self, exc: CredentialsRefused | None) -> None:
        """Consume only while every configured service accepts our credentials."""
        assert self.consumer is not None
        if exc is not None:
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
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, CHECK_BACKOFF_CAP)
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
        if self.consumer:
            cancelled = await self.consumer.stop(self.settings.shutdown_grace)
            if cancelled:
                log.warning("%d messages left unfinished; the broker requeues them", cancelled)
        if self.connection:
            await self.connection.close()
        await self.seam.close()
        for channel in self.channels.values():
            await channel.close()
        if self.http:
            await self.http.stop()
        log.info("worker stopped")

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        await self.stopping.wait()
        await self.stop()

    def _http_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def readyz(_: web.Request) -> web.Response:
            return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app
