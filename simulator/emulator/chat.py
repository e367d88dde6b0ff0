"""How vLLM turns an OpenAI chat request into chat-template inputs, for the emulator.

Pure; no I/O. Used by ``simulator.emulator.pod`` (the codec renders with it) and
``simulator.emulator.http``. Must not import ``router``: the router has its own copy of these
rules (``router/prompt/chat_render.py``), and the emulator must agree with vLLM, not with the router,
so that a parity mismatch between the two shows up in tests instead of being hidden.

vLLM does not hand the request's messages to ``apply_chat_template`` as received:
- each message keeps only ``role``, ``content``, assistant ``tool_calls`` (a string
  ``function.arguments`` parsed from JSON into an object), a tool message's ``tool_call_id``,
  and ``name``;
- ``content`` (a string, a list of text parts, or null) becomes one string (text parts joined
  with ``"\\n"``; null is ``""``) when the template uses ``message.content`` as a string, or a
  list of ``{"type": "text", "text": ...}`` parts when the template loops over it (vLLM's
  ``auto`` content format, detected from the template's syntax tree);
- ``tools`` go in as vLLM's pydantic dump: ``{"type", "function": {"name", "description",
  "parameters"}}``, absent fields as null, unknown keys kept after them;
- the template gets ``tools``, ``documents``, ``add_generation_prompt`` (default true),
  ``continue_final_message`` and ``chat_template_kwargs``.

Bad shapes raise ``ChatError`` (the client's fault: a 400 naming the field).

Tool choice: a forced named choice (``{"type": "function", "function": {"name": N}}``) makes vLLM
answer with a tool call to N whose arguments are the (guided, JSON) output;
``named_tool_choice`` returns N after checking it names one of ``tools``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ChatError", "ChatInputs", "content_format", "named_tool_choice", "shape_chat"]

_RESERVED = frozenset(
    {"conversation", "messages", "tools", "documents", "add_generation_prompt",
     "continue_final_message", "tokenize", "chat_template", "return_dict"}
)  # fmt: skip


class ChatError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ChatInputs:
    """What ``apply_chat_template`` receives for one request (messages not yet shaped to a
    content format: that needs the template, see ``conversation``)."""

    messages: list[Mapping[str, Any]]
    tools: list[dict[str, Any]] | None
    documents: Any
    add_generation_prompt: bool
    continue_final_message: bool
    kwargs: dict[str, Any]

    def conversation(self, template: str) -> list[dict[str, Any]]:
        return _shape_messages(self.messages, content_format(template))


def shape_chat(body: Mapping[str, Any]) -> ChatInputs:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list of {role, content}", "messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise ChatError(f"messages[{i}] must be an object with a string role", "messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ChatError("tools must be a list", "tools")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ChatError("chat_template_kwargs must be an object", "chat_template_kwargs")
    add_generation_prompt = body.get("add_generation_prompt", True)
    continue_final = body.get("continue_final_message", False)
    if not isinstance(add_generation_prompt, bool) or not isinstance(continue_final, bool):
        raise ChatError(
            "add_generation_prompt and continue_final_message must be booleans",
            "add_generation_prompt",
        )
    return ChatInputs(
        messages=messages,
        tools=_shape_tools(tools) if tools else None,
        documents=body.get("documents"),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        kwargs={k: v for k, v in kwargs.items() if k not in _RESERVED},
    )


def named_tool_choice(body: Mapping[str, Any]) -> str | None:
    """The function name a forced named ``tool_choice`` asks for, else None ("auto", "none",
    "required" or absent)."""
    choice = body.get("tool_choice")
    if not isinstance(choice, Mapping):
        return None
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise ChatError("tool_choice.function.name must be a string", "tool_choice")
    tools = body.get("tools")
    names = [
        t["function"].get("name")
        for t in tools or []
        if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
    ]
    if name not in names:
        raise ChatError(f"Tool '{name}' has not been passed in `tools`.", "tool_choice")
    return name


def _shape_tools(tools: list[Any]) -> list[dict[str, Any]]:
    shaped = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ChatError(f"tools[{i}].function.name must be a string", "tools")
        function: dict[str, Any] = {
            "name": fn["name"],
            "description": fn.get("description"),
            "parameters": fn.get("parameters"),
        }
        function.update({k: v for k, v in fn.items() if k not in function})
        entry: dict[str, Any] = {"type": tool.get("type", "function"), "function": function}
        entry.update({k: v for k, v in tool.items() if k not in entry})
        shaped.append(entry)
    return shaped


def _shape_messages(messages: list[Mapping[str, Any]], fmt: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        texts = _texts(msg.get("content"), i)
        shaped: dict[str, Any] = {"role": msg["role"]}
        if fmt == "openai":
            shaped["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            shaped["content"] = "\n".join(texts)
        if msg["role"] == "assistant" and msg.get("tool_calls") is not None:
            shaped["tool_calls"] = [_parsed_call(c) for c in msg["tool_calls"]]
        elif msg["role"] == "tool" and "tool_call_id" in msg:
            shaped["tool_call_id"] = msg["tool_call_id"]
        if isinstance(msg.get("name"), str):
            shaped["name"] = msg["name"]
        out.append(shaped)
    return out


def _texts(content: Any, index: int) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise ChatError(
            f"messages[{index}].content must be a string or a list of parts", "messages"
        )
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatError(f"messages[{index}].content: a text part needs a string text",
                                "messages")
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
