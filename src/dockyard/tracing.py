"""Tracing with OpenTelemetry, optional (``pip install dockyard[otel]``).

A server span per request (W3C trace context taken from the client's ``traceparent``), with
child spans for authentication (``auth``), registry operations (``registry.*``: upload commit,
manifest get/put, blob stat/open...) and storage calls at the :class:`~dockyard.storage.store.
Store` boundary (``storage.*``). The access log carries the request's ``trace_id``.

Configured only with the standard ``OTEL_*`` environment variables. Tracing is on in a worker
when opentelemetry's SDK is installed, ``OTEL_SDK_DISABLED`` is not ``true`` and the environment
names somewhere to send spans: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``; ``none`` turns
tracing off) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. The
exporter, sampler (``OTEL_TRACES_SAMPLER``), batching (``OTEL_BSP_*``), resource
(``OTEL_SERVICE_NAME``, default ``dockyard``; ``OTEL_RESOURCE_ATTRIBUTES``) and propagators
(``OTEL_PROPAGATORS``) read their own variables.

When it is off nothing of opentelemetry is imported, no middleware is installed, and each
:func:`traced` method costs one test of a module global. Spans of the model and of storage are
made only inside a request's span (maintenance in the background makes none).

This module is below every layer (the model and storage use it) and imports none of them, nor
aiohttp at module level.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from dockyard.errors import ConfigError

__all__ = [
    "configure",
    "disable",
    "enable",
    "enabled",
    "flush",
    "in_repository",
    "middleware",
    "span",
    "traced",
    "wanted",
]

log = logging.getLogger("dockyard.tracing")


#: the Tracer while tracing is on in this process; None when it is off (the one test hot paths
#: make)
_tracer: Any = None
_provider: Any = None
_get_current_span: Any = None
_error_status: Any = None

T = TypeVar("T")


def enabled() -> bool:
    return _tracer is not None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be sent somewhere."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on in this process if the environment asks for it (see the module's
    docstring); True if it is on. A worker calls it after the fork (span processors hold
    threads). ConfigError for an exporter that is unknown or not installed."""
    if _tracer is not None:
        return True
    environ = os.environ if environ is None else environ
    if not wanted(environ):
        return False
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_* variables ask for traces but OpenTelemetry is not installed "
            "(pip install 'dockyard[otel]'): tracing is off"
        )
        return False
    processors = [BatchSpanProcessor(exporter) for exporter in _exporters(environ)]
    if not processors:
        return False
    enable(*processors, set_global=True)
    return True


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    exporters = []
    for name in (n.strip() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            try:
                if protocol == "grpc":
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                        OTLPSpanExporter,
                    )
                else:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                        OTLPSpanExporter,
                    )
            except ImportError:
                package = "opentelemetry-exporter-otlp-proto-" + (
                    "grpc" if protocol == "grpc" else "http"
                )
                raise ConfigError(
                    "OTEL_TRACES_EXPORTER", f"otlp over {protocol} needs {package} installed"
                ) from None
            exporters.append(OTLPSpanExporter())
        else:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER", f"unknown exporter {name!r} (otlp, console or none)"
            )
    return exporters


def enable(*processors: Any, set_global: bool = False) -> None:
    """Trace in this process, sending finished spans to ``processors`` (SpanProcessors; tests
    pass a SimpleSpanProcessor over an InMemorySpanExporter)."""
    global _tracer, _provider, _get_current_span, _error_status
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    from dockyard import __version__

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "dockyard"}))
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)  # for instrumentations an operator adds
    _provider = provider
    _get_current_span = trace.get_current_span
    _error_status = trace.Status(trace.StatusCode.ERROR)
    _tracer = provider.get_tracer("dockyard", __version__)


def disable() -> None:
    """Stop tracing in this process (flushing what is pending)."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


def flush() -> None:
    """Send the spans still batched (a worker calls it as it stops)."""
    if _provider is not None:
        _provider.force_flush()


# -- spans for the model and storage ----------------------------------------------------------


class _NoSpan:
    """What :func:`span` gives when tracing is off: a context manager doing nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> Any:
    """``with tracing.span("auth"):`` a child span of the request's, when tracing is on and
    there is a request; otherwise nothing. See :func:`traced` for ``expected``."""
    tracer = _tracer
    if tracer is None or not _get_current_span().is_recording():
        return _NO_SPAN
    return _child(tracer, name, attributes, expected)


@contextmanager
def _child(
    tracer: Any,
    name: str,
    attributes: Mapping[str, Any] | None,
    expected: tuple[type[BaseException], ...],
) -> Iterator[Any]:
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            current.set_attribute("error.type", type(exc).__qualname__)
            if not isinstance(exc, (*expected, asyncio.CancelledError)):
                current.record_exception(exc)
                current.set_status(_error_status)
            raise


def traced(
    name: str,
    attributes: Callable[..., Mapping[str, Any]] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Decorate an async method so each call is a span ``name`` (a child of the current one;
    none outside a request or when tracing is off). ``attributes(self, *args)`` gives the
    span's attributes, computed only when the span is made. An exception is named in the
    span (``error.type``); one of ``expected`` (a missing file, a registry error answered to
    the client) does not make it an error span."""

    def decorate(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(method)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
            tracer = _tracer
            if tracer is None or not _get_current_span().is_recording():
                return await method(self, *args, **kwargs)
            with _child(
                tracer,
                name,
                attributes(self, *args) if attributes is not None else None,
                expected,
            ):
                return await method(self, *args, **kwargs)

        return wrapper

    return decorate


def in_repository(model: Any, *_: object) -> dict[str, str]:
    """The attributes of a span of a repository's operation (``model.name``)."""
    return {"dockyard.repository": model.name}


# -- the request span -------------------------------------------------------------------------


def middleware(trace_id_key: Any) -> Any:
    """The aiohttp middleware making each request a server span (outermost but for the client
    address), leaving the trace id on the request under ``trace_id_key`` (a RequestKey of the
    HTTP layer) for the access log. Only called when tracing is on."""
    from aiohttp import web
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode, format_trace_id

    tracer = _tracer
    assert tracer is not None, "tracing is off"

    @web.middleware
    async def trace_request(request: web.Request, handler: Any) -> web.StreamResponse:
        parent = propagate.extract(request.headers)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        name = f"{request.method} {route}" if route else request.method
        attributes = {
            "http.request.method": request.method,
            "url.path": request.path,  # never the query: it may carry an upload's state
            "url.scheme": request.scheme,
            "user_agent.original": request.headers.get("User-Agent", ""),
        }
        if route:
            attributes["http.route"] = route
        with tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as current:
            request[trace_id_key] = format_trace_id(current.get_span_context().trace_id)
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except BaseException as exc:
                current.record_exception(exc)
                raise
            finally:
                current.set_attribute("http.response.status_code", status)
                if status >= 500:
                    current.set_status(Status(StatusCode.ERROR))

    return trace_request
