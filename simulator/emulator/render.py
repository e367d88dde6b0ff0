"""vLLM's render endpoints on an emulated pod: ``POST /v1/completions/render`` and ``POST
/v1/chat/completions/render`` turn an OpenAI request into the token-in ``GenerateRequest`` the
engine would run, without running it. vllm-router's cache_aware policy calls them on every
worker for every request to learn the prompt's token ids.

Async (aiohttp); used by ``simulator.emulator.http``. Must not import ``router``.

vLLM >= 0.30 serves them only when started with ``--enable-scale-out`` (``kvrouter emulate
--enable-scale-out``, ``PodConfig.scale_out``); otherwise they are not routes at all (404).

Wire shape (vLLM's ``GenerateRequest``): ``{"request_id", "token_ids", "features": null,
"sampling_params": {...}, "model", "stream", "stream_options", "cache_salt", "priority",
"kv_transfer_params", "token_offsets": null}``. Completions answer a LIST, one per prompt
(``prompt`` may be a batch), ``request_id`` ``cmpl-...``; chat answers ONE object,
``request_id`` ``chatcmpl-...``. ``sampling_params`` carries the request's sampling fields with
vLLM's defaults (``max_tokens``: the request's, else 16 for completions and what is left of
``max_model_len`` for chat). Errors as on the generation routes (400 / 404, vLLM's JSON shape).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from simulator.emulator.pod import EmulatedPod
from simulator.emulator.requests import (
    POD_KEY,
    ClientError,
    chat_ids,
    check_model,
    dumps,
    max_tokens_of,
    prompt_ids,
    read_body,
)

__all__ = ["add_render_routes"]

# vLLM's SamplingParams defaults for the fields a router may read.
_SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
}


def _sampling_params(body: dict[str, Any], max_tokens: int, chat: bool) -> dict[str, Any]:
    params = dict(_SAMPLING_DEFAULTS)
    for key in _SAMPLING_DEFAULTS:
        if body.get(key) is not None:
            params[key] = body[key]
    if isinstance(params["stop"], str):
        params["stop"] = [params["stop"]]
    if chat:
        params["logprobs"] = body.get("top_logprobs", 0) if body.get("logprobs") else None
    params["max_tokens"] = max_tokens
    return params


def _generate_request(pod: EmulatedPod, body: dict[str, Any], ids: list[int], kind: str,
                      sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": f"{kind}-{uuid.uuid4().hex}",
        "token_ids": ids,
        "features": None,
        "sampling_params": sampling,
        "model": pod.config.model,
        "stream": bool(body.get("stream", False)),
        "stream_options": body.get("stream_options"),
        "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0),
        "kv_transfer_params": body.get("kv_transfer_params"),
        "token_offsets": None,
    }


def _prompts(body: dict[str, Any]) -> list[Any]:
    """A batch prompt (a list of strings, or a list of token-id lists) as its prompts."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return list(prompt)
    return [prompt]


async def completions_render(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = await read_body(request)
    check_model(pod, body)
    out = []
    for prompt in _prompts(body):
        ids = prompt_ids(pod, {**body, "prompt": prompt})
        max_tokens = max_tokens_of(pod, body, len(ids), chat=False)
        out.append(_generate_request(pod, body, ids, "cmpl",
                                     _sampling_params(body, max_tokens, chat=False)))
    return web.json_response(out, dumps=dumps)


async def chat_render(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = await read_body(request)
    check_model(pod, body)
    ids = chat_ids(pod, body)
    left = pod.config.max_model_len - len(ids)
    if left < 1:
        raise ClientError(400, f"This model's maximum context length is "
                               f"{pod.config.max_model_len} tokens. However, your request has "
                               f"{len(ids)} input tokens.", "messages")
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = max_tokens_of(pod, {**body, "max_tokens": requested or left}, len(ids),
                               chat=False)
    answer = _generate_request(pod, body, ids, "chatcmpl",
                               _sampling_params(body, max_tokens, chat=True))
    return web.json_response(answer, dumps=dumps)


def add_render_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions/render", completions_render)
    app.router.add_post("/v1/chat/completions/render", chat_render)
