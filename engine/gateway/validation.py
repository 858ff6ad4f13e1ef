"""Request validation at the edge: every malformed or hostile body becomes a 4xx with a message
before any engine is touched. The models describe the fields the gateway and engines rely on;
other OpenAI/vLLM sampling fields pass through unchanged (extra="allow") for the engine to judge.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from pydantic_core import from_json

Float = Annotated[float, Field(allow_inf_nan=False)]
Stop = str | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=8)] | None


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: dict[str, bool] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    ignore_eos: bool | None = None
    priority: Annotated[int, Field(ge=-1000, le=1000)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=1_048_576)]


class CompletionRequest(_Request):
    # Every form vLLM and the OpenAI API accept: text, texts, token ids, lists of token ids.
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=16)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=16)]
    )
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None


class TextPart(BaseModel):
    # Only text parts: the builtin models are text-only, and arbitrary part objects would reach
    # the engine's multimodal parsers (an SSRF surface for image_url) for no benefit.
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=64)] | None = None


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=512)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class InputText(BaseModel):
    # Text parts only, as for chat: image or file parts would reach the engine's multimodal
    # loaders (an SSRF surface) for a text-only model.
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["message"] | None = None
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[InputText], Field(max_length=64)]


class ResponsesRequest(_Request):
    """The OpenAI Responses API as vLLM serves it: `input` text or a list of message items."""

    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[InputMessage], Field(min_length=1, max_length=512)]
    )
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None


ROUTE_MODELS: dict[str, type[_Request]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
}


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise RequestError(400, "request body is empty; expected a JSON object")
    try:
        # pydantic's parser (Rust): a seventh of json.loads' time with a hook, on the hot path.
        # NaN/Infinity are not JSON (Python's json accepts them; the engine does not).
        document = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise RequestError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise RequestError(400, "request body must be a JSON object")
    return document


def validate_body(route: str, document: dict[str, Any], *, model_name: str, max_model_len: int) -> _Request:
    try:
        request = ROUTE_MODELS[route].model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise RequestError(400, f"invalid request: {problems}") from None
    if request.model != model_name:
        raise RequestError(
            404, f"model {request.model!r} does not exist; serving {model_name!r}", "model_not_found"
        )
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list):
        for ids in _token_prompts(request.prompt):
            if len(ids) > max_model_len:
                raise RequestError(
                    400, f"prompt of {len(ids)} tokens exceeds the context length {max_model_len}"
                )
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        # From __dict__: getattr on a field a model lacks goes through pydantic's slow
        # __getattr__ (extra="allow") and an exception.
        value = request.__dict__.get(field)
        if value is not None and value > max_model_len:
            raise RequestError(400, f"{field} {value} exceeds the model's context length {max_model_len}")
    return request


def _token_prompts(prompt: list[Any]) -> list[list[int]]:
    """The token-id prompts of a completion's `prompt` list (none when it is a list of texts)."""
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return [p for p in prompt if isinstance(p, list)]


def _text_tokens(chars: int) -> int:
    return chars // 4 + 1  # ≈4 characters per token; usage corrects it afterwards


def _items_chars(items: list[InputMessage]) -> int:
    return sum(
        len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content) for m in items
    )


def prompt_tokens(request: _Request) -> list[int]:
    """Tokens of each prompt in the request (exact for token ids, estimated for text)."""
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, str):
            return [_text_tokens(len(prompt))]
        if isinstance(prompt[0], str):
            return [_text_tokens(len(p)) for p in prompt if isinstance(p, str)]
        return [len(ids) for ids in _token_prompts(prompt)]
    if isinstance(request, ChatCompletionRequest):
        chars = sum(
            len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
            for m in request.messages
        )
        return [_text_tokens(chars)]
    if isinstance(request, ResponsesRequest):
        given = request.input
        chars = len(given) if isinstance(given, str) else _items_chars(given)
        return [_text_tokens(chars + len(request.instructions or ""))]
    return [1]  # pragma: no cover - every route has its model


def estimated_tokens(request: _Request, max_model_len: int) -> int:
    """Tokens to pre-charge a tenant's tokens/min bucket: each prompt plus what the engine may
    generate for it — the output cap, or without one the rest of the context (vLLM's own
    default), `n` times; corrected from the engine's usage afterwards."""
    fields = request.__dict__
    cap = fields.get("max_completion_tokens") or fields.get("max_output_tokens") or request.max_tokens
    total = 0
    for tokens in prompt_tokens(request):
        tokens = min(max_model_len, tokens)
        total += tokens + (request.n or 1) * (cap or max(1, max_model_len - tokens))
    return total


def openapi_components(
    model_name: str, max_model_len: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(route -> request body schema ref, component schemas) for the gateway's OpenAPI, with the
    served model and output caps of this service (what `validate_body` enforces)."""
    _, top = models_json_schema(
        [(model, "validation") for model in ROUTE_MODELS.values()],
        ref_template="#/components/schemas/{model}",
    )
    components: dict[str, Any] = top.get("$defs", {})
    for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
        components[name]["properties"]["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            prop = components[name]["properties"].get(field)
            if prop is not None:
                prop["anyOf"][0]["maximum"] = max_model_len
    refs = {
        route: {"$ref": f"#/components/schemas/{model.__name__}"} for route, model in ROUTE_MODELS.items()
    }
    return refs, components
