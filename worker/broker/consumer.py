"""The thin executor: takes messages from the work queues, runs the trust checks and the flow, and
has ``settle`` carry out what ``decision.decide`` chose: ack, retry through the delay queues,
requeue or dead-letter. Tracing, metrics and logs watch (``observers``)."""

import asyncio
import logging
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from functools import partial

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry.trace import Tracer

from worker import tracing
from worker.actions import Action, Outcome
from worker.broker.connect import BROKER_ERRORS
from worker.broker.decision import (
    Decision,
    Limits,
    Settled,
    Trust,
    check_clock,
    check_event,
    check_publisher,
    decide,
)
from worker.broker.observers import Logs, Measures, Observer, Tracing
from worker.broker.publisher import Publisher
from worker.broker.returns import Returns, key
from worker.broker.settle import Handling, Settler, held, printable, redelivery, refusal
from worker.errors import CredentialsRefused, Permanent, Reason, Transient
from worker.events import ANNOUNCEMENTS, check_size, parse
from worker.flows import Flows
from worker.metrics import Metrics
from worker.queues import Names
from worker.routes import ROUTES, Route, handle

log = logging.getLogger("worker.consumer")

CANCEL_TIMEOUT = 2.0  # seconds to stop a consumer; past it the broker is gone and so is it


class Consumer:
    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        publisher: Publisher,
        names: Names,
        flows: Flows,
        metrics: Metrics,
        *,
        limits: Limits,
        trust: Trust,
        deadline: timedelta,
        on_credentials_refused: Callable[[CredentialsRefused], None],
        returns: Returns | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.channel = channel
        self.publisher = publisher
        self.flows = flows
        self.limits = limits
        self.trust = trust
        self.deadline = deadline
        self.returns = returns or Returns()
        self.settler = Settler(publisher, names.dead, self.returns, on_credentials_refused)
        # Queue -> the route of the type it takes; None for the main exchange's unroutable events.
        self._routes: dict[str, Route | None] = {**names.takes, names.unroutable: None}
        self._patient = {names.queue(route) for route in ROUTES if route.patient}
        self.observers: list[Observer] = [
            Tracing(tracer or tracing.tracer()),
            Measures(metrics, self._patient),
            Logs(),
        ]
        self._queues: dict[str, AbstractQueue] = {}
        self._tags: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._holding = self.settler.holding  # unsettled message -> its queue

    @property
    def consuming(self) -> bool:
        return bool(self._tags)

    @property
    def holding(self) -> int:
        """Messages in hand, unsettled, on a channel still open."""
        return sum(1 for message in self._holding if held(message))

    async def resume(self) -> None:
        for name in self._routes:
            if name not in self._tags:
                queue = self._queues.get(name) or await self.channel.get_queue(name)
                self._queues[name] = queue
                self._tags[name] = await queue.consume(partial(self._on_message, name))

    async def pause(self) -> None:
        """Stop taking new messages; those in flight go on. Bounded: with the broker gone, a
        robust queue's cancel would wait for the reconnect, for ever."""
        tags = list(self._tags.items())
        self._tags.clear()
        await asyncio.gather(*(self._cancel(name, tag) for name, tag in tags))

    async def _cancel(self, name: str, tag: str) -> None:
        try:
            # The robust queue forgets the consumer first, so a reconnect will not restore it.
            await asyncio.wait_for(self._queues[name].cancel(tag), CANCEL_TIMEOUT)
        except BROKER_ERRORS:
            log.warning("could not cancel consumer", extra={"ctx": {"queue": name}})

    async def stop(self, grace: float) -> int:
        """Pause, let in-flight messages finish within ``grace`` seconds, cancel the rest.

        A cancelled handler leaves its message unacked: the broker requeues it when the channel
        closes. Returns how many were cancelled.
        """
        await self.pause()
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        self._note(list(self._holding), loss=True)  # what we leave goes back at the close
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def lost(self, *_: object) -> None:
        """The consuming channel closed (its close callback): the broker takes back what it
        held, and what was on its way to it."""
        self._note([m for m in self._holding if not held(m)], loss=True)

    def _note(self, gone: list[AbstractIncomingMessage], loss: bool = False) -> None:
        self.returns.note((key(self._holding.pop(m), m.body) for m in gone), loss)

    async def _on_message(self, queue: str, message: AbstractIncomingMessage) -> None:
        # aio-pika runs each delivery's callback in a task of its own: the message is handled in
        # it (a second task per message cost CPU for nothing), known to ``stop`` meanwhile.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(Handling.begin(queue, message, self.trust))
        finally:
            self._tasks.discard(task)

    async def _handle(self, h: Handling) -> None:
        with ExitStack() as watching:
            for observer in self.observers:
                watching.enter_context(observer.watch(h))
            self._holding[h.message] = h.queue
            try:
                early = redelivery(h, self.returns)
                try:
                    if early is None:
                        h.outcome = await self._work(h)
                except Exception as exc:
                    h.error = exc
                h.settled = await self._settle(h, early)
                for observer in self.observers:
                    observer.settled(h)
            finally:
                # Not settled, and its channel gone (aio-pika cancels the handler with it).
                if self._holding.get(h.message) and not held(h.message):
                    self._note([m for m in self._holding if not held(m)])
                self._holding.pop(h.message, None)
                # The error's traceback holds this frame, which holds the error: a cycle that
                # would keep the message (its body: up to max_message_size) until a full GC.
                h.error = None

    async def _settle(self, h: Handling, early: Decision | None) -> Settled:
        try:
            h.decided = early or decide(
                h.error,
                held=held(h.message),
                attempt=h.book.attempt,
                first_failed_at=h.book.first_failed_at,
                now=datetime.now(UTC),
                limits=self.limits,
                patient=h.queue in self._patient,
            )
            settled = await asyncio.shield(self.settler.carry_out(h, h.decided))
            refused = refusal(h, self._routes[h.queue])
            if settled is Settled.DEAD_LETTERED and refused is not None:
                await asyncio.shield(self.publisher.announce(refused))
        except Exception as exc:
            settled = await asyncio.shield(self.settler.give_back(h.message, exc))
        fenced = h.outcome is not None and h.outcome.action is Action.FENCED
        return Settled.FENCED if fenced and settled is Settled.ACKED else settled

    async def _work(self, h: Handling) -> Outcome:
        message = h.message
        check_size(message.body)  # first: a body over the limit is not even checked for trust
        route = self._routes[h.queue]
        if route is None:
            if message.user_id == self.trust.worker and message.routing_key in ANNOUNCEMENTS:
                return Outcome(Action.UNHEARD)  # our own outcome event, with nobody listening
            raise Permanent(
                f"no queue takes routing key {printable(message.routing_key)!r}",
                reason=Reason.UNROUTABLE,
            )
        check_publisher(route, message.user_id, h.producer, self.trust)
        h.event = event = parse(message.body, message.content_type, message.content_encoding)
        check_event(route, event, h.producer, self.trust)
        assert h.book.received_at is not None
        check_clock(event, h.book.received_at, self.limits.max_clock_skew)
        for observer in self.observers:
            observer.accepted(h)
        seconds = self.deadline.total_seconds()
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await handle(self.flows, event, partial(held, message))
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # a timeout of its own (a Seam call, a confirm), not the deadline
            raise Transient(f"not done within IKW_MESSAGE_DEADLINE ({seconds:g} s)") from exc
