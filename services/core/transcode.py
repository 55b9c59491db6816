"""HTTP/JSON routes for the typed gRPC APIs, transcoded as gRPC-JSON transcoding does.

:data:`RULES` holds one route per RPC (as ``google.api.http`` rules would in the protos). A request is
turned into the RPC's own request message (``google.protobuf.json_format``: proto3 JSON, bytes as
base64; query parameters fill fields by their proto names, ``diffusion.steps=20``), and the same
servicer method the gRPC server registers is awaited with an :class:`HttpContext`. Images can also
be sent as they are: a raw body (``Content-Type: image/png``) or ``multipart/form-data`` file parts
fill the rule's upload fields. Replies are the response message as JSON, or, for ``Accept:
image/png``, the image itself; a server-streaming RPC answers as Server-Sent Events.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from services.core import error_details, errors
from services.core.errors import InvalidInput, shorten
from services.core.http_context import HttpContext, convert, http_status, read_body
from services.core.interceptor import status_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """How one RPC is reached over HTTP."""

    rpc: str  # full method name, package.Service.Method
    path: str
    # Request fields that a raw image body or multipart file parts fill, first the default one.
    uploads: tuple[str, ...] = ()
    # For Accept: image/png, the request field and value that make the reply one PNG, and where it is.
    png_request: tuple[str, int] | None = None
    png_reply: str = ""
    methods: tuple[str, ...] = ("POST",)


RULES = [
    Rule("nnserve.v1.ClassifyService.Classify", "/v1/classify", uploads=("images",)),
    Rule(
        "nnserve.v1.RestoreService.Restore",
        "/v1/restore",
        uploads=("images", "masks"),
        png_request=("output", 1),  # RESTORE_OUTPUT_PNG
        png_reply="restorations.png",
    ),
    Rule(
        "nnserve.v1.GenerateService.Generate",
        "/v1/generate",
        png_request=("output", 2),  # GENERATE_OUTPUT_GRID
        png_reply="grid_png",
    ),
    # GET too: a browser's EventSource can only GET (fields then come as query parameters).
    Rule("nnserve.v1.GenerateService.GenerateStream", "/v1/generate/stream", methods=("GET", "POST")),
    # Every service: the model card's facts (path parameters fill the request fields they name).
    Rule("nnserve.model.v1.ModelInfo.ListModels", "/v1/models", methods=("GET",)),
    Rule("nnserve.model.v1.ModelInfo.DescribeModel", "/v1/models/{name}", methods=("GET",)),
    Rule("nnserve.model.v1.ModelInfo.DescribeModel", "/v1/models/{name}/versions/{version}", methods=("GET",)),
]

JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"


def _wants_png(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "image/png" in accept and "application/json" not in accept


def _query_fields(request: web.Request) -> dict[str, Any]:
    """Query parameters as a nested proto3-JSON dict: ``a.b=1`` -> {"a": {"b": "1"}}; repeats make lists."""
    fields: dict[str, Any] = {}
    for key in request.query:
        values = request.query.getall(key)
        node = fields
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidInput(f"query parameter {shorten(key)}", "mixes a field and its sub-fields")
            node = child
        node[leaf] = values if len(values) > 1 else values[0]
    return fields


def _parse_into(message: Message, document: Any, where: str) -> None:
    if not isinstance(document, dict):
        raise InvalidInput(where, f"must be a JSON object, got {type(document).__name__}")
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as exc:
        raise InvalidInput(where, errors.scrub(str(exc)).replace("\n", " ")) from None


def _multipart(body: bytes, content_type: str) -> list[tuple[str, bytes, bool]]:
    """The parts of a multipart/form-data body: (name, content, is_file)."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not parsed.is_multipart():
        raise InvalidInput("request body", "is not multipart/form-data with a boundary")
    parts = []
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise InvalidInput("request body", "a multipart part has no name in its Content-Disposition")
        payload = part.get_payload(decode=True)
        content = payload if isinstance(payload, bytes) else b""
        parts.append((name, content, part.get_filename() is not None))
    return parts


async def request_message(rule: Rule, cls: type[Message], request: web.Request) -> Message:
    """The RPC's request message from the body (JSON, multipart or a raw image) and the query."""
    body = await read_body(request)
    media = request.content_type if "Content-Type" in request.headers else ""
    if body and not (
        media in JSON_TYPES
        or (rule.uploads and (media == MULTIPART or media.startswith("image/") or media == "application/octet-stream"))
    ):
        accepted = ["application/json"]
        if rule.uploads:
            accepted += [MULTIPART, "image/*", "application/octet-stream"]
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type: {shorten(media or 'none')} is not accepted here; send {', '.join(accepted)}"
        )
    if not body and media and media not in JSON_TYPES:
        raise web.HTTPUnsupportedMediaType(text=f"Content-Type: {shorten(media)} with an empty body")
    message = await convert(len(body), parse_body, rule, cls, body, media, request.headers.get("Content-Type", ""))
    _parse_into(message, _query_fields(request), "query parameter")
    if request.match_info:  # {name} in a rule's path: the field of that name
        _parse_into(message, dict(request.match_info), "path")
    return message


def parse_body(rule: Rule, cls: type[Message], body: bytes, media: str, content_type: str) -> Message:
    """The request message a body fills: proto3 JSON, multipart parts, or one raw image."""
    message = cls()
    if not body:
        return message
    if media in JSON_TYPES:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidInput("request body", "is not valid JSON") from None
        _parse_into(message, document, "request body")
    elif media == MULTIPART:
        fields: dict[str, Any] = {}
        for name, content, is_file in _multipart(body, content_type):
            upload = name if name in rule.uploads else name + "s" if name + "s" in rule.uploads else None
            if upload is not None:
                getattr(message, upload).append(content)
            elif is_file:
                raise InvalidInput(f"part {shorten(name)}", f"file parts go in {' or '.join(rule.uploads)}")
            else:
                fields[name] = content.decode("utf-8", errors="replace")
        _parse_into(message, fields, "form field")
    else:
        getattr(message, rule.uploads[0]).append(body)
    return message


def _reply_json(message: Message) -> bytes:
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(document, separators=(",", ":")).encode()


def _png_reply(rule: Rule, reply: Message) -> web.Response:
    if rule.png_reply == "grid_png":
        headers = {"X-Seed": str(reply.seed), "X-Labels": ",".join(map(str, reply.labels))}  # type: ignore[attr-defined]
        return web.Response(body=reply.grid_png, content_type="image/png", headers=headers)  # type: ignore[attr-defined]
    restorations = reply.restorations  # type: ignore[attr-defined]
    if len(restorations) != 1:
        raise InvalidInput(
            "Accept header", f"image/png answers one image; this request has {len(restorations)} (accept JSON instead)"
        )
    headers = {
        "X-Anomaly-Score": repr(restorations[0].anomaly_score),
        "X-Anomalous": str(restorations[0].anomalous).lower(),
    }
    return web.Response(body=restorations[0].png, content_type="image/png", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TypedRoutes:
    """The HTTP routes of the typed servicers one service registers."""

    def __init__(self, servicers: dict[str, Any]) -> None:
        """``servicers``: full service name -> servicer instance."""
        self.servicers = servicers

    def routes(self) -> list[web.RouteDef]:
        """One route (or one per method) for every rule whose service is served here."""
        pool = descriptor_pool.Default()
        routes = []
        for rule in RULES:
            servicer = self.servicers.get(rule.rpc.rsplit(".", 1)[0])
            if servicer is None:  # not served here (and its proto maybe not even imported)
                continue
            method = pool.FindMethodByName(rule.rpc)
            cls = message_factory.GetMessageClass(method.input_type)
            call = getattr(servicer, method.name)
            if method.server_streaming:
                handler = self._streaming(rule, cls, call)
            else:
                handler = self._unary(rule, cls, call)
            routes += [web.route(verb, rule.path, handler) for verb in rule.methods]
        return routes

    @staticmethod
    def _unary(rule: Rule, cls: type[Message], call: Callable[..., Awaitable[Message]]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            message = await request_message(rule, cls, request)
            png = rule.png_request is not None and _wants_png(request)
            if png:
                assert rule.png_request is not None
                field, value = rule.png_request
                setattr(message, field, value)
            reply = await call(message, HttpContext(request, request.get("deadline")))
            if png:
                return _png_reply(rule, reply)
            encoded = await convert(reply.ByteSize(), _reply_json, reply)
            return web.Response(body=encoded, content_type="application/json")

        handle.__doc__ = f"{rule.path}: {rule.rpc} over HTTP/JSON."
        return handle

    @staticmethod
    def _streaming(rule: Rule, cls: type[Message], call: Callable[..., AsyncIterator[Message]]) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            message = await request_message(rule, cls, request)
            events = call(message, HttpContext(request, request.get("deadline"))).__aiter__()
            try:
                # Errors before the first event (validation, admission) keep their HTTP status.
                first = await events.__anext__()
                response = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no",
                    }
                )
                await response.prepare(request)
                try:
                    event: Message | None = first
                    while event is not None:
                        kind = event.WhichOneof("event") or "event"  # type: ignore[attr-defined]
                        data = json_format.MessageToDict(getattr(event, kind), preserving_proto_field_name=True)
                        text = json.dumps(data, separators=(",", ":"))
                        await response.write(f"event: {kind}\ndata: {text}\n\n".encode())
                        event = await anext(events, None)
                except ConnectionResetError:  # the client went away: nobody to tell
                    return response
                except Exception as exc:  # the status line has gone: the error is the last event
                    code, message_text = status_for(exc)
                    error: dict[str, Any] = {"error": message_text, "status": http_status(code)}
                    details = error_details.details_json(exc)
                    if details:
                        error["details"] = details
                    if error["status"] == 500:
                        log.error("%s failed", rule.path, exc_info=exc)
                    await response.write(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
                await response.write_eof()
                return response
            finally:
                # Ends the servicer's stream now (its finally cancels the sampling job), not at GC.
                await events.aclose()  # type: ignore[attr-defined]

        handle.__doc__ = f"{rule.path}: {rule.rpc} as Server-Sent Events."
        return handle
