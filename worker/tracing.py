"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` variables ask for it.

Everything here speaks the OpenTelemetry API only. With no SDK set up (the default) every tracer
is the API's no-op one: a span costs a context switch and carries no attributes. ``setup`` builds
the SDK's TracerProvider from the environment for ``ikw run`` and ``ikw publish``.

Span attributes are ids, names of queues and paths, status codes and outcomes: never an Instant
Key URL, a phone number or an email address, which are not even passed to the helpers below.
"""

import os
import secrets
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import Token
from functools import cache
from importlib.metadata import entry_points
from importlib.metadata import version as package_version
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracer,
    ProxyTracer,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from worker.variables import ConfigError

NAME = "instant-key-worker"
EXPORTER_GROUP = "opentelemetry_traces_exporter"  # the SDK's entry points for exporters
# OTLP over HTTP is what the [otlp] extra installs; gRPC works if its package is installed.
OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
OTLP_EXTRA = "pip install 'instant-key-worker[otlp]'"

# What `ikw run --help` lists (the SDK reads more: OTEL_BSP_*, OTEL_TRACES_SAMPLER, ...).
VARIABLES: tuple[tuple[str, str], ...] = (
    ("OTEL_TRACES_EXPORTER", "tracing: otlp, console or none (default: none, tracing off)"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "tracing: OTLP collector; setting it turns tracing on"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "tracing: OTLP traces URL; turns tracing on too"),
    ("OTEL_SDK_DISABLED", "true: tracing off whatever else is set"),
    ("OTEL_SERVICE_NAME", "tracing: service.name (default instant-key-worker)"),
)


def tracer(provider: TracerProvider | None = None) -> Tracer:
    """The worker's tracer from ``provider``, else from the global provider (a no-op one unless
    ``setup`` installed the SDK; the proxy follows a provider installed later)."""
    return trace.get_tracer(NAME, _version(), tracer_provider=provider)


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for, by the SDK's conventions; [] means tracing off.

    Off unless asked: OTEL_TRACES_EXPORTER other than ``none``, or an OTLP endpoint (then
    ``otlp``). OTEL_SDK_DISABLED=true turns it off whatever else is set."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    listed = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if listed:
        names = [name.strip() for name in listed.split(",") if name.strip()]
        return [] if "none" in names else names
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return ["otlp"] if any(environ.get(name, "").strip() for name in endpoints) else []


def setup(environ: Mapping[str, str] | None = None) -> Any:
    """An SDK TracerProvider exporting through the exporters the environment names, each behind
    a BatchSpanProcessor (OTEL_BSP_* tune it; OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME are read by the SDK as usual); None when tracing is off. The caller installs
    it (``trace.set_tracer_provider``) and calls ``shutdown()`` on stop, which flushes."""
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    if not names:
        return None
    exporters = [_exporter(name, env) for name in names]
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without either, ours.
    resource = Resource.create({"service.version": _version()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: NAME}))
    provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    entry = name
    if name == "otlp":
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in OTLP_BY_PROTOCOL:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: must be http/protobuf or grpc, got {protocol!r}"
            )
        entry = OTLP_BY_PROTOCOL[protocol]
    found = list(entry_points(group=EXPORTER_GROUP, name=entry))
    if not found:
        hint = f"; {OTLP_EXTRA}" if entry == "otlp_proto_http" else ""
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed "
            f"(otlp, console or none){hint}"
        )
    return found[0].load()()


# --- propagation -----------------------------------------------------------------------------


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """AMQP headers: values may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


HEADERS = _HeaderGetter()


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The context a message's headers carry (``traceparent``, ``tracestate``); empty if none."""
    return propagate.extract(headers or {}, getter=HEADERS)


def inject(headers: MutableMapping[str, Any], context: Context | None = None) -> None:
    """Write the current (or ``context``'s) span into ``headers``; nothing when there is none."""
    propagate.inject(headers, context=context)


def new_trace() -> Span:
    """A fresh, sampled trace that no SDK records: what ``ikw publish`` hands the worker when its
    own tracing is off, so the worker's spans and log lines still share one trace id."""
    return trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=int.from_bytes(secrets.token_bytes(16), "big") or 1,
            span_id=int.from_bytes(secrets.token_bytes(8), "big") or 1,
            is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
    )


def has_trace(context: Context | None = None) -> bool:
    return trace.get_current_span(context).get_span_context().is_valid


# --- spans -----------------------------------------------------------------------------------


def records(tracer: Tracer) -> bool:
    """False when ``tracer`` is the API's no-op one (tracing off): its spans carry nothing. A
    ProxyTracer is asked each time, since it follows a provider installed after it was made."""
    if isinstance(tracer, ProxyTracer):
        tracer = tracer._tracer
    return not isinstance(tracer, NoOpTracer)


class _Untraced:
    """What ``span`` is with tracing off, without the cost of the API's no-op span (a generator
    context manager and a context attach per span, eight per grant). The same context results:
    a no-op tracer's span is its parent's span context, so a child changes nothing and is not
    attached; a span given a ``context`` (a message's ``traceparent``) makes that current, so
    log lines and the messages published under it carry the producer's trace."""

    __slots__ = ("_attach", "_span", "_token")

    def __init__(self, context: Context | None) -> None:
        current = trace.get_current_span(context)
        # Under another provider's recording span (not ours), attach as the API would, so that
        # attributes set on "the current span" do not land on that span.
        self._attach = context is not None or current.is_recording()
        self._token: Token[Context] | None = None
        self._span: Span = (
            current
            if isinstance(current, NonRecordingSpan)
            else NonRecordingSpan(current.get_span_context())
        )

    def __enter__(self) -> Span:
        if self._attach:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)


def span(
    tracer: Tracer,
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, str | int | float | bool],
    context: Context | None = None,
) -> AbstractContextManager[Span]:
    """A span made current (``context``: its parent, else the current span). An exception
    leaving it sets the status to ERROR and ``error.type`` to its class name; its message is not
    recorded (the worker's messages are clean, a library's may quote what we sent)."""
    if not records(tracer):
        return _Untraced(context)
    return _recorded(tracer, name, kind, attributes, context)


@contextmanager
def _recorded(
    tracer: Tracer,
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, str | int | float | bool],
    context: Context | None = None,
) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=dict(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            fail(current, type(exc).__name__)
            raise


def client_span(
    tracer: Tracer, name: str, attributes: Mapping[str, str | int]
) -> AbstractContextManager[Span]:
    """A CLIENT span around one call to Seam, Twilio or SMTP."""
    return span(tracer, name, SpanKind.CLIENT, attributes)


def fail(span: Span, error_type: str, description: str | None = None) -> None:
    if span.is_recording():
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, description))


@cache
def _version() -> str:
    try:
        return package_version(NAME)
    except Exception:
        return "unknown"
