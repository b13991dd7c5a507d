"""POST /tokenize and POST /detokenize (vLLM's extensions): text or chat messages -> token ids, and back."""

from __future__ import annotations

from quanta.serve.errors import bad_request
from quanta.serve.protocol import DetokenizeRequest, TokenizeRequest
from quanta.serve.responses import json_response
from quanta.serve.server import OpenAIServer
from quanta.serve.validation import parse


async def tokenize(server: OpenAIServer, request):
    data = await server.checks.read_json(request)
    server.checks.check_model(data)
    req = parse(TokenizeRequest, data)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    if req.prompt is not None:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = server.prompts.encode(req.prompt, add, "prompt")
    else:
        text = server.prompts.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
        ids = server.prompts.encode(text, bool(req.add_special_tokens), "messages")
    body = {"count": len(ids), "max_model_len": server.engine.max_seq_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [str(t) for t in server.tokenizer.convert_ids_to_tokens(ids)]
    return json_response(body)


async def detokenize(server: OpenAIServer, request):
    data = await server.checks.read_json(request)
    server.checks.check_model(data)
    req = parse(DetokenizeRequest, data)
    for t in req.tokens:
        if not 0 <= t < server.vocab_size:
            raise bad_request(f"tokens: token id {t} is out of range [0, {server.vocab_size})", param="tokens")
    if server.tokenizer is None:
        raise bad_request("this server has no tokenizer", param="tokens")
    try:
        text = server.tokenizer.decode(req.tokens)
    except Exception as e:
        raise bad_request(f"tokens could not be decoded: {str(e)[:200]}", param="tokens") from None
    return json_response({"prompt": text})
