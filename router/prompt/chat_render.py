"""Render a chat request to the prompt text the engine will tokenize, the way vLLM does.

vLLM does not hand the OpenAI messages to the chat template as received. It first reshapes
them, and a router that skips this renders different text and loses every cache hit:

- content: a string or a list of parts becomes, per the template's *content format*, either one
  string (text parts joined with ``"\\n"``) when the template treats ``message.content`` as a
  string, or a list of ``{"type": "text", "text": ...}`` parts when the template loops over it
  (detected from the template's syntax tree, as vLLM's ``auto`` mode does); null content is
  empty; non-text parts carry no text;
- each message keeps only ``role``, ``content``, and ``tool_calls`` (assistant, with
  ``function.arguments`` JSON strings parsed into objects), ``tool_call_id`` (tool), ``name``;
- ``tools`` are filled to vLLM's pydantic dump: ``{"type", "function": {"name",
  "description", "parameters"}}`` with missing fields as null, extra keys kept after;
- ``apply_chat_template(tokenize=False, add_generation_prompt=True unless the body says
  otherwise, continue_final_message, tools, documents, **chat_template_kwargs)``.

Must not import aiohttp, asyncio or anything from ``simulator``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["PromptError", "PromptRejected", "content_format", "render_chat", "shape_messages",
           "shape_tools"]


class PromptError(ValueError):
    """The request's prompt cannot be turned into tokens (wrong shape); the client's fault.
    The router routes such a request on an estimate and lets the engine answer it."""


class PromptRejected(PromptError):
    """The prompt is invalid in a way no engine accepts (text that is not valid Unicode):
    the router answers 400 itself."""

_RESERVED = frozenset(
    {"conversation", "messages", "tools", "documents", "add_generation_prompt",
     "continue_final_message", "tokenize", "chat_template", "return_dict"}
)


def render_chat(hf_tokenizer: Any, body: Mapping[str, Any]) -> str:
    """The rendered prompt text; raises PromptError on a body the engine would reject."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise PromptError("tools must be a list")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise PromptError("chat_template_kwargs must be an object")
    add_generation_prompt = body.get("add_generation_prompt", True)
    continue_final = body.get("continue_final_message", False)
    if not isinstance(add_generation_prompt, bool) or not isinstance(continue_final, bool):
        raise PromptError("add_generation_prompt and continue_final_message must be booleans")
    shaped_tools = shape_tools(tools) if tools else None
    try:
        template = hf_tokenizer.get_chat_template(None, shaped_tools)
    except ValueError as exc:  # no chat template (a base model): the engine answers it
        raise PromptError(f"no chat template: {exc}") from None
    conversation = shape_messages(messages, content_format(template))
    extra = {k: v for k, v in kwargs.items() if k not in _RESERVED}
    try:
        text = hf_tokenizer.apply_chat_template(
            conversation,
            tools=shaped_tools,
            documents=body.get("documents"),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
            tokenize=False,
            **extra,
        )
    except Exception as exc:  # jinja errors, raise_exception() in templates, bad combinations
        raise PromptError(f"chat template failed: {exc}") from exc
    if not isinstance(text, str):
        raise PromptError("chat template did not render text")
    return text


def shape_messages(messages: list[Any], fmt: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise PromptError(f"messages[{i}] must be an object with a string role")
        role = msg["role"]
        texts = _texts(msg.get("content"), i)
        shaped: dict[str, Any] = {"role": role}
        if fmt == "openai":
            shaped["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            shaped["content"] = "\n".join(texts)
        if role == "assistant" and msg.get("tool_calls") is not None:
            calls = msg["tool_calls"]
            if not isinstance(calls, list):
                raise PromptError(f"messages[{i}].tool_calls must be a list")
            shaped["tool_calls"] = [_parsed_call(c) for c in calls]
        elif role == "tool" and "tool_call_id" in msg:
            shaped["tool_call_id"] = msg["tool_call_id"]
        if isinstance(msg.get("name"), str):
            shaped["name"] = msg["name"]
        out.append(shaped)
    return out


def shape_tools(tools: list[Any]) -> list[dict[str, Any]]:
    shaped = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise PromptError(f"tools[{i}].function.name must be a string")
        function = {"name": fn["name"], "description": fn.get("description"),
                    "parameters": fn.get("parameters")}
        function.update({k: v for k, v in fn.items() if k not in function})
        entry: dict[str, Any] = {"type": tool.get("type", "function"), "function": function}
        entry.update({k: v for k, v in tool.items() if k not in entry})
        shaped.append(entry)
    return shaped


@functools.lru_cache(maxsize=64)
def content_format(template: str) -> str:
    """'openai' when the template loops over ``message['content']``, else 'string'."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return "string"
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Filter) and it.node is not None:
            it = it.node
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const):
            if it.arg.value == "content":
                return "openai"
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return "openai"
    return "string"


def _texts(content: Any, index: int) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise PromptError(f"messages[{index}].content must be a string or a list of parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(f"messages[{index}].content: a text part needs a string text")
            texts.append(text)
    return texts


def _parsed_call(call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    fn = call.get("function")
    if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return dict(call)
        return {**call, "function": {**fn, "arguments": args}}
    return dict(call)
