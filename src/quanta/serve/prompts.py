"""Request prompts -> token ids: /v1/completions' four prompt shapes, chat messages through the chat
template, and prompt truncation; every failure is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from quanta.serve.errors import bad_request
from quanta.serve.protocol import ChatMessage, CompletionRequest


def _is_token_id(t: Any) -> bool:
    return type(t) is int


def truncate(prompts: list[tuple[str | None, list[int]]], n: int | None) -> list[tuple[str | None, list[int]]]:
    """truncate_prompt_tokens: keep the last n tokens (a cut prompt loses its text)."""
    if n is None:
        return prompts
    if n < 1:
        raise bad_request(f"truncate_prompt_tokens must be >= 1, got {n}", param="truncate_prompt_tokens")
    return [(text if len(ids) <= n else None, ids[-n:]) for text, ids in prompts]


class PromptBuilder:
    """Encodes and checks prompts against one tokenizer and vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.chat_template_override = chat_template  # --chat-template: wins over the tokenizer's

    def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer: send token ids", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {e.start}",
                              param=param) from None
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as e:  # lone surrogates and the like
            raise bad_request(f"{param}: the text could not be tokenized ({type(e).__name__}: {str(e)[:200]})",
                              param=param) from None

    def check_ids(self, ids: list, param: str) -> None:
        if not ids:
            raise bad_request(f"{param} is empty: give a non-empty string or at least one token id", param=param)
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise bad_request(f"{param}: token id {t} is out of range [0, {self.vocab_size})", param=param)

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        msg = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if p is None:
            raise bad_request("missing required field 'prompt'", param="prompt")
        if isinstance(p, str):
            items = [p]
        elif isinstance(p, list) and p and all(_is_token_id(t) for t in p):
            items = [p]
        elif isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(
                isinstance(x, list) and all(_is_token_id(t) for t in x) for x in p)):
            items = p
        elif isinstance(p, list) and not p:
            raise bad_request("prompt is empty: give a non-empty string or at least one token id", param="prompt")
        else:
            raise bad_request(msg, param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt is empty: give a non-empty string or at least one token id",
                                      param="prompt")
                ids = self.encode(item, req.add_special_tokens, "prompt")
                out.append((item, ids))
            else:
                self.check_ids(item, "prompt")
                out.append((None, list(item)))
        return out

    def chat_template(self) -> str:
        template = self.chat_template_override or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise bad_request("this model has no chat template, so /v1/chat/completions cannot format messages: "
                              "start the server with --chat-template FILE, or use /v1/completions",
                              param="messages", code="chat_template_missing")
        return template

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool) -> str:
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer: chat needs one", param="messages")
        template = self.chat_template()
        if not messages:
            raise bad_request("messages must hold at least one message", param="messages")
        conv = [_conversation_entry(i, m) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                conv, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
        except Exception as e:  # template errors (raise_exception), bad flag combinations ...
            raise bad_request(f"could not apply the chat template to these messages: {str(e)[:300]}",
                              param="messages") from None
        if not isinstance(text, str):
            raise bad_request("the chat template did not render to text", param="messages")
        return text


def _conversation_entry(i: int, m: ChatMessage) -> dict:
    """messages[i] as the chat template's dict (text parts joined by newlines); unsupported parts are a 400."""
    if m.role not in ("system", "user", "assistant", "developer"):
        raise bad_request(f"messages.{i}.role {m.role[:40]!r} is not supported yet (tool messages need "
                          "tool calling): use system, user or assistant", param=f"messages.{i}.role")
    for name in ("tool_calls", "tool_call_id", "function_call"):
        if getattr(m, name) not in (None, []):
            raise bad_request(f"messages.{i}.{name}: tool calling is not supported yet in quanta",
                              param=f"messages.{i}.{name}")
    content = m.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages.{i}.content.{j}: content parts of type {part.type[:40]!r} are "
                                  "not supported yet (text only)", param=f"messages.{i}.content.{j}")
            texts.append(part.text)
        content = "\n".join(texts)
    entry = {"role": m.role, "content": content if content is not None else ""}
    if m.name is not None:
        entry["name"] = m.name
    return entry
