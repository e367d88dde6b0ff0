"""Request parsing and errors shared by the emulator's HTTP handlers (``simulator.emulator.http``
and ``simulator.emulator.render``): the JSON body, the model check, the prompt as token ids
(a string, token ids, or chat messages through the tokenizer's template), ``max_tokens`` and
the answer's shape (n, logprobs, a forced tool).

Async only in ``read_body``; used by the emulator. Must not import ``router``.

Errors use vLLM's shape ``{"error": {"message", "type", "param", "code"}}``: 400
``BadRequestError``, 404 ``NotFoundError``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from simulator.emulator.chat import ChatError, ChatInputs, named_tool_choice, shape_chat
from simulator.emulator.choices import ChoiceShape, ShapeError, parse_shape
from simulator.emulator.pod import EmulatedPod

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "POD_KEY",
    "ClientError",
    "chat_ids",
    "chat_inputs",
    "check_model",
    "choice_shape",
    "dumps",
    "error_response",
    "errors_middleware",
    "max_tokens_of",
    "prompt_ids",
    "read_body",
    "token_list",
]

POD_KEY = web.AppKey("pod", EmulatedPod)
DEFAULT_MAX_TOKENS = 16


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": status}},
        status=status,
    )


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClientError as exc:
        return error_response(exc.status, exc.message, exc.param)


async def read_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ClientError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "The request body must be a JSON object")
    return body


def check_model(pod: EmulatedPod, body: dict[str, Any], required: bool = True) -> None:
    model = body.get("model")
    if model is None:
        if required:
            raise ClientError(400, "The 'model' field is required", "model")
        return
    if model != pod.config.model:
        raise ClientError(404, f"The model `{model}` does not exist.", "model")


def token_list(value: object) -> list[int] | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    ):
        return list(value)
    return None


def prompt_ids(pod: EmulatedPod, body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = pod.codec.encode(prompt)
    else:
        ids = token_list(prompt) or []
        if not ids and prompt not in ("", []):
            raise ClientError(400, "prompt must be a string or a list of token ids", "prompt")
    if not ids:
        raise ClientError(400, "The prompt cannot be empty", "prompt")
    if max(ids) >= pod.codec.vocab_size:
        raise ClientError(400, f"Token id {max(ids)} is out of vocabulary", "prompt")
    return ids


def chat_inputs(body: dict[str, Any]) -> ChatInputs:
    try:
        return shape_chat(body)
    except ChatError as exc:
        raise ClientError(400, str(exc), exc.param) from None


def chat_ids(pod: EmulatedPod, body: dict[str, Any]) -> list[int]:
    inputs = chat_inputs(body)
    try:
        return pod.codec.chat(inputs)
    except Exception as exc:  # a template error is the client's malformed messages
        raise ClientError(400, f"Cannot apply the chat template: {exc}", "messages") from None


def max_tokens_of(pod: EmulatedPod, body: dict[str, Any], prompt_len: int, chat: bool) -> int:
    value = body.get("max_completion_tokens") if chat else None
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        value = DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClientError(400, "max_tokens must be an integer >= 1", "max_tokens")
    limit = pod.config.max_model_len
    if prompt_len + value > limit:
        raise ClientError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + value} tokens ({prompt_len} in the messages, {value} in the "
            "completion). Please reduce the length of the messages or completion.",
            "max_tokens" if prompt_len < limit else "messages",
        )
    return value


def choice_shape(body: dict[str, Any], chat: bool) -> ChoiceShape:
    try:
        tool = named_tool_choice(body) if chat else None
        return parse_shape(body, chat, tool)
    except (ChatError, ShapeError) as exc:
        raise ClientError(400, str(exc), exc.param) from None
