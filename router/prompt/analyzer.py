"""From a parsed OpenAI request body to the ``RouteRequest`` a policy sees.

Two steps. ``read_fields`` validates the body once (model, prompt or messages, stream, user,
max_tokens, the session header) and raises ``InvalidRequest`` naming the bad field; the proxy
calls it for every request, so every analyzer sees valid input. Then a ``RequestAnalyzer`` turns
the fields into a ``RouteRequest``. ``CharEstimateAnalyzer`` (the default) estimates prompt
tokens from characters with no tokenizer; a tokenizing analyzer (exact tokens, block hashes)
implements the same protocol and is passed to ``router.app.create_app``.

Must not import aiohttp or other ``router`` modules except ``router.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final, Protocol

from policies.types import RouteRequest, value_type
from router.errors import InvalidRequest

__all__ = [
    "CharEstimateAnalyzer",
    "Endpoint",
    "RequestAnalyzer",
    "RequestFields",
    "read_fields",
]


class Endpoint:
    COMPLETIONS: Final = "completions"
    CHAT: Final = "chat"
    OTHER: Final = "other"


@value_type
class RequestFields:
    """What the proxy read from one request; ``body`` is the parsed JSON (never re-sent)."""

    endpoint: str
    path: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    request_id: str
    model: str
    prompt_text: str = ""
    prompt_token_ids: tuple[int, ...] | None = None
    session_key: str | None = None
    stream: bool = False
    max_tokens: int | None = None


class RequestAnalyzer(Protocol):
    async def analyze(self, fields: RequestFields) -> RouteRequest: ...


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _prompt_of_completion(prompt: object) -> tuple[str, tuple[int, ...] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "".join(prompt), None
        if _is_int_list(prompt):
            return "", tuple(prompt)
        if all(_is_int_list(p) for p in prompt):
            return "", tuple(t for p in prompt for t in p)
    raise InvalidRequest(
        "'prompt' must be a string, a list of strings, or a list of token ids", param="prompt"
    )


def _text_of_messages(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    parts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"'messages[{i}]' must be an object with a string 'role'", param=f"messages[{i}]"
            )
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise InvalidRequest(f"'messages[{i}].tool_calls' must be a list",
                                 param=f"messages[{i}].tool_calls")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
        elif content is not None:
            raise InvalidRequest(
                f"'messages[{i}].content' must be a string, a list of parts or null",
                param=f"messages[{i}].content",
            )
    return "".join(parts)


def read_fields(
    endpoint: str,
    path: str,
    body: object,
    headers: Mapping[str, str],
    request_id: str,
    session_header: str,
) -> RequestFields:
    """Validate what routing needs; raises InvalidRequest with the field in ``param``.

    ``body`` is parsed JSON, so objects are ``dict``: checked with ``isinstance(x, dict)``,
    not against the ``Mapping`` ABC, whose check costs more than the rest of a field's."""
    if endpoint == Endpoint.OTHER:
        # Pass-through endpoints: route on the model when there is one, validate nothing else.
        model = body.get("model") if isinstance(body, dict) else None
        return RequestFields(
            endpoint=endpoint, path=path, body=body if isinstance(body, dict) else {},
            headers=headers, request_id=request_id, model=model if isinstance(model, str) else "",
            session_key=headers.get(session_header) or None,
        )
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    if endpoint == Endpoint.COMPLETIONS:
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is required", param="prompt")
        text, token_ids = _prompt_of_completion(body["prompt"])
    else:
        if "messages" not in body:
            raise InvalidRequest("'messages' is required", param="messages")
        text, token_ids = _text_of_messages(body["messages"]), None
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise InvalidRequest("'max_tokens' must be an integer", param="max_tokens")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", param="user")
    # The session key: the configured header first, then the OpenAI `user` field.
    session_key = headers.get(session_header) or user or None
    return RequestFields(
        endpoint=endpoint, path=path, body=body, headers=headers, request_id=request_id,
        model=model, prompt_text=text, prompt_token_ids=token_ids, session_key=session_key,
        stream=bool(stream), max_tokens=max_tokens,
    )


class CharEstimateAnalyzer:
    """No tokenizer: prompt tokens = ceil(characters / ``chars_per_token``); no block hashes."""

    def __init__(self, chars_per_token: float = 4.0) -> None:
        self.chars_per_token = chars_per_token

    async def analyze(self, fields: RequestFields) -> RouteRequest:
        if fields.prompt_token_ids is not None:
            tokens, exact = len(fields.prompt_token_ids), True
        else:
            tokens, exact = math.ceil(len(fields.prompt_text) / self.chars_per_token), False
        return RouteRequest(
            request_id=fields.request_id,
            model=fields.model,
            prompt_tokens=tokens,
            prompt_text=fields.prompt_text,
            session_key=fields.session_key,
            max_tokens=fields.max_tokens if fields.max_tokens is not None else 16,
            stream=fields.stream,
            tokens_exact=exact,
        )
