"""An emulated pod's HTTP front: vLLM's OpenAI-compatible API (and SGLang's info endpoints),
served by aiohttp over one ``EmulatedPod``.

Async; used by ``simulator.emulator.fleet``. Must not import ``router``.

Routes: ``POST /v1/completions`` and ``/v1/chat/completions`` (prompt as a string or token ids,
chat through the tokenizer's template; ``stream`` with SSE ``data: {...}`` chunks and
``data: [DONE]``; chat's first chunk carries ``delta: {"role": "assistant", "content": ""}``, sent with the first token
as vLLM does;
``stream_options.include_usage`` adds a last chunk with ``choices: []`` and ``usage``;
``usage.prompt_tokens_details.cached_tokens`` always; ``vllm_xargs: {"kv_cache_report_mode":
"full"}`` re-announces a request's hit blocks as a BlockStored with no parent), ``GET /v1/models`` (with
``max_model_len``), ``GET /health``, ``GET /version``, ``POST /tokenize``, ``POST /detokenize``,
``GET /kv_event_sources``, ``POST /reset_prefix_cache``, ``GET /metrics``; with
``engine_kind="sglang"`` also ``GET /get_server_info`` and ``GET /get_model_info``; with
``scale_out`` the render endpoints (``simulator.emulator.render``).

Chat renders ``tools``, ``documents`` and ``chat_template_kwargs`` into the template, messages
shaped as vLLM shapes them (``simulator.emulator.chat``). ``n`` > 1, ``logprobs`` and a forced
named ``tool_choice`` take the general answer path (``simulator.emulator.choices``); a plain
single choice takes the fast path below.

Errors use vLLM's shape ``{"error": {"message", "type", "param", "code"}}``: 400
``BadRequestError`` (bad JSON, missing model, bad prompt, max_tokens, n, logprobs or
tool_choice, prompt plus max_tokens over ``max_model_len``), 404 ``NotFoundError`` (unknown
model). ``max_tokens`` defaults to 16. Parsing lives in ``simulator.emulator.requests``.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from simulator.emulator.choices import ChoiceShape, collect_choices, stream_choices
from simulator.emulator.pd import PD_KEY, PdError
from simulator.emulator.pod import EmulatedPod, TokenStream
from simulator.emulator.render import add_render_routes
from simulator.emulator.requests import (
    POD_KEY,
    ClientError,
    chat_ids,
    check_model,
    choice_shape,
    dumps,
    errors_middleware,
    max_tokens_of,
    prompt_ids,
    read_body,
    token_list,
)

__all__ = ["POD_KEY", "build_app"]

def _usage(stream: TokenStream) -> dict[str, Any]:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "total_tokens": stream.prompt_tokens + stream.produced,
        "completion_tokens": stream.produced,
        "prompt_tokens_details": {"cached_tokens": stream.cached_tokens},
    }


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    pod = request.app[POD_KEY]
    body = await read_body(request)
    check_model(pod, body)
    ids = chat_ids(pod, body) if chat else prompt_ids(pod, body)
    max_tokens = max_tokens_of(pod, body, len(ids), chat)
    shape = choice_shape(body, chat)
    # Prefill/decode roles (simulator.emulator.pd): plan, and pull the KV a decode needs.
    pd = request.app.get(PD_KEY)
    if pd is not None and not shape.simple:
        raise ClientError(400, "n > 1, logprobs and a forced tool_choice are not emulated "
                               "on prefill/decode pods", "n")
    if pd is not None:
        try:
            plan, pulled = await pd.prepare(pod, body, ids)
        except PdError as exc:
            raise ClientError(exc.status, exc.message) from None
        max_tokens = min(max_tokens, plan.max_tokens or max_tokens)
    streaming = bool(body.get("stream"))
    options = body.get("stream_options")
    usage = streaming and isinstance(options, dict) and bool(options.get("include_usage"))
    xargs = body.get("vllm_xargs")
    report_hits = isinstance(xargs, dict) and xargs.get("kv_cache_report_mode") == "full"
    if not shape.simple:
        return await _generate_choices(request, pod, ids, max_tokens, shape, streaming, usage,
                                       report_hits)
    try:
        stream = pod.submit(ids, max_tokens, streaming, report_hits)
    except ValueError as exc:
        if pd is not None:
            pd.finished(plan, len(ids), ok=False)
        raise ClientError(400, str(exc)) from None
    if pd is not None:
        pd.submitted(pod, pulled)
    try:
        if streaming:
            return await _stream(request, pod, stream, chat, usage)
        response = await _collect(pod, stream, chat)
        if pd is not None:
            pd.answer(response, plan, len(ids))
        return response
    finally:
        if pd is not None:
            pd.finished(plan, len(ids), ok=stream.finished)
        if not stream.finished:
            pod.cancel(stream)


async def _generate_choices(
    request: web.Request,
    pod: EmulatedPod,
    ids: list[int],
    max_tokens: int,
    shape: ChoiceShape,
    streaming: bool,
    usage: bool,
    report_hits: bool,
) -> web.StreamResponse:
    """n choices, logprobs or a forced tool call (simulator.emulator.choices): n engine
    requests with the same prompt, like vLLM's parallel sampling."""
    streams: list[TokenStream] = []
    try:
        for _ in range(shape.n):
            try:
                streams.append(pod.submit(ids, max_tokens, streaming, report_hits))
            except ValueError as exc:
                raise ClientError(400, str(exc)) from None
        request_id = f"{'chatcmpl' if shape.chat else 'cmpl'}-{streams[0].request_id}"
        if streaming:
            return await stream_choices(request, pod, streams, shape, request_id, usage)
        answer = await collect_choices(pod, streams, shape, request_id)
        return web.json_response(answer, dumps=dumps)
    finally:
        for stream in streams:
            if not stream.finished:
                pod.cancel(stream)


async def _collect(pod: EmulatedPod, stream: TokenStream, chat: bool) -> web.Response:
    await stream.done()
    text = stream.text()
    choice: dict[str, Any]
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    return web.json_response(
        {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{stream.request_id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": pod.config.model,
            "choices": [choice],
            "usage": _usage(stream),
        },
        dumps=dumps,
    )


async def _stream(
    request: web.Request, pod: EmulatedPod, stream: TokenStream, chat: bool, usage: bool
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{stream.request_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": pod.config.model,
    }

    def event(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        return f"data: {dumps({**head, 'choices': choices, **(extra or {})})}\n\n"

    # vLLM sends chat's role chunk on its first engine output, with the first token, not at
    # once: a router reading the first body chunk as the first token must see vLLM's timing.
    role_event = ""
    if chat:
        role = {"role": "assistant", "content": ""}
        role_event = event([{"index": 0, "delta": role, "logprobs": None, "finish_reason": None}])
    # Token chunks differ only in the token and the finish reason: serialize the rest once.
    opening = dumps(head)[:-1] + ',"choices":[{"index":0,'
    field = '"delta":{"content":' if chat else '"text":'
    closing = "}" if chat else ""
    sent = 0
    while (token := await stream.next_token()) is not None:
        sent += 1
        # Exactly max_tokens come out (EOS is ignored), so the last one is known on arrival.
        last = sent >= stream.max_tokens
        finish = '"length"' if last else "null"
        chunk = (
            f"data: {opening}{field}{dumps(token)}{closing},"
            f'"logprobs":null,"finish_reason":{finish},"stop_reason":null}}]}}\n\n'
        )
        if role_event:
            chunk, role_event = role_event + chunk, ""
        if not last:
            await response.write(chunk.encode())
            continue
        # The last token, the usage chunk, [DONE] and the end of the body leave in one send.
        tail = event([], {"usage": _usage(stream)}) if usage else ""
        await response.write_eof(f"{chunk}{tail}data: [DONE]\n\n".encode())
        return response
    # The producer ended without a last token (not expected): still end the stream properly.
    await response.write_eof(f"{role_event}data: [DONE]\n\n".encode())
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def models(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    model = pod.config.model
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": pod.config.engine_kind,
                    "root": model,
                    "parent": None,
                    "max_model_len": pod.config.max_model_len,
                    "permission": [],
                }
            ],
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.32.0+emulated"})


async def tokenize(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = await read_body(request)
    check_model(pod, body, required=False)
    ids = chat_ids(pod, body) if "messages" in body else prompt_ids(pod, body)
    return web.json_response(
        {
            "count": len(ids),
            "max_model_len": pod.config.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
    )


async def detokenize(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    body = await read_body(request)
    check_model(pod, body, required=False)
    ids = token_list(body.get("tokens"))
    if ids is None:
        raise ClientError(400, "tokens must be a non-empty list of token ids", "tokens")
    return web.json_response({"prompt": pod.codec.decode(ids)})


async def kv_event_sources(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    sources = [pod.publisher.source_info()] if pod.publisher is not None else []
    return web.json_response(sources)


async def reset_prefix_cache(request: web.Request) -> web.Response:
    # vLLM answers 200 whether or not the reset happened (it is refused while blocks are held).
    request.app[POD_KEY].reset_prefix_cache()
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[POD_KEY].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def server_info(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    cfg = pod.config
    return web.json_response(
        {
            "model_path": cfg.model,
            "tokenizer_path": pod.codec.name,
            "served_model_name": cfg.model,
            "page_size": cfg.block_size,
            "max_total_num_tokens": cfg.num_gpu_blocks * cfg.block_size,
            "context_length": cfg.max_model_len,
            "max_running_requests": cfg.max_num_seqs,
            "chunked_prefill_size": cfg.max_num_batched_tokens,
            "version": "0.5.0+emulated",
        }
    )


async def model_info(request: web.Request) -> web.Response:
    pod = request.app[POD_KEY]
    return web.json_response(
        {"model_path": pod.config.model, "tokenizer_path": pod.codec.name, "is_generation": True}
    )


def build_app(pod: EmulatedPod) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024 * 1024)
    app[POD_KEY] = pod
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/kv_event_sources", kv_event_sources)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/metrics", metrics)
    if pod.config.scale_out:
        add_render_routes(app)
    if pod.config.engine_kind == "sglang":
        app.router.add_get("/get_server_info", server_info)
        app.router.add_get("/get_model_info", model_info)
    return app
