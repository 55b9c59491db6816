"""The grpc.aio server of one service process: servicers, health, reflection, start and graceful stop.

:class:`GrpcServer` binds, starts the model slots' workers, reports SERVING once its models are warm and, on
:meth:`GrpcServer.stop`, turns health NOT_SERVING, refuses new calls while clients move away,
closes the listener and lets in-flight calls finish within the grace period. Error mapping, auth
and metrics are the interceptor's (:mod:`services.core.interceptor`); signals and the process's
life are :mod:`services.core.lifecycle`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core import modelinfo
from services.core.credentials import bearer_token, server_credentials
from services.core.deployment import ModelSlot
from services.core.interceptor import HOLD_BEFORE_CLOSE_S, ServerInterceptor
from services.core.metrics import Metrics
from services.core.settings import ServiceSettings


@dataclass
class Service:
    """What a service process serves: gRPC servicers (with their full service names) and model slots."""

    name: str
    metrics: Metrics
    slots: list[ModelSlot[Any]] = field(default_factory=list)
    servicers: list[tuple[Callable[[Any, Any], None], Any, str]] = field(default_factory=list)

    def add_servicer(self, add_to_server: Callable[[Any, Any], None], servicer: Any, full_name: str) -> None:
        self.servicers.append((add_to_server, servicer, full_name))

    @property
    def service_names(self) -> list[str]:
        return [full_name for _, _, full_name in self.servicers]

    @property
    def models(self) -> dict[str, str]:
        """The versions being served now, {name: version}."""
        return {slot.current.name: str(slot.current.version) for slot in self.slots}


class GrpcServer:
    """A started grpc.aio server for one :class:`Service`, with health and reflection."""

    def __init__(self, service: Service, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Several workers share the port; otherwise a second server on it is an error, not a share.
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ]
        exempt = (health.SERVICE_NAME + "/",) if settings.auth_exempt_health else ()
        self.interceptor = ServerInterceptor(service.metrics, bearer_token(settings), exempt)
        if modelinfo.SERVICE_NAME not in service.service_names:
            # Every server describes its models the same way (the HTTP server, built from the same
            # Service afterwards, gets its routes too).
            service.add_servicer(
                modelinfo.add_to_server, modelinfo.ModelInfoServicer(service.slots), modelinfo.SERVICE_NAME
            )
        self.server = aio.server(options=options)
        # Every servicer registers through the interceptor, which wraps its handlers once here
        # rather than on every call; methods nobody registered reach its fallback.
        registrar = self.interceptor.registrar(self.server)
        for _, servicer, _ in service.servicers:
            self.interceptor.readers.update(getattr(servicer, "request_readers", {}))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        for add_to_server, servicer, _ in service.servicers:
            add_to_server(servicer, registrar)
        names = [*service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, registrar)
        self.server.add_generic_rpc_handlers((self.interceptor.fallback(),))
        self.port = 0
        self._watchers: list[asyncio.Task[None]] = []
        # Other listeners of this process (the HTTP server): closed with the gRPC listener, their
        # in-flight requests given the same grace, before the model workers stop.
        self.also_close: list[Callable[[float], Awaitable[None]]] = []

    async def reload(self) -> None:
        """Load the newest version of every reloadable model (SIGHUP)."""
        for slot in self.service.slots:
            await slot.reload(explicit=True)

    async def start(self) -> int:
        """Bind, start the slots' workers and the server, then report SERVING; returns the bound port."""
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        for slot in self.service.slots:
            slot.start()
        await self.server.start()
        if self.settings.model_poll_interval_s > 0:
            loop = asyncio.get_running_loop()
            self._watchers = [
                loop.create_task(slot.watch(self.settings.model_poll_interval_s)) for slot in self.service.slots
            ]
        for name in ["", *self.service.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def close_now(self) -> None:
        """Close at once, with no drain: for a start that failed part way (a busy HTTP port), so the
        gRPC server closes on this loop rather than in its finalizer once the loop is gone."""
        for watcher in self._watchers:
            watcher.cancel()
        await self.server.stop(None)
        for slot in self.service.slots:
            await slot.stop()

    async def stop(self, grace: float) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace``, stop the workers."""
        for watcher in self._watchers:
            watcher.cancel()
        await self.health.enter_graceful_shutdown()
        self.interceptor.draining = True
        for slot in self.service.slots:
            slot.begin_drain()
        delay = self.settings.shutdown_delay_s
        hold = min(HOLD_BEFORE_CLOSE_S, delay)
        if delay - hold > 0:
            await asyncio.sleep(delay - hold)
        self.interceptor.holding = True
        if hold:
            await asyncio.sleep(hold)
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)  # the close (GOAWAY, listener) has begun once stop() first yields
        self.interceptor.closing()
        await asyncio.gather(stopping, *(close(grace) for close in self.also_close))
        for slot in self.service.slots:
            await slot.stop()
