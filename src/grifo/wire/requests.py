"""OpenAI request bodies as strict msgspec structs.

Decoding is the allow-list: unknown fields, wrong types (no coercion: `"stream": "false"` is an
error) and out-of-range numbers are rejected with `InvalidRequestError` naming the parameter, and
re-encoding a decoded request sends engines only the fields listed here. A body that is not
UTF-8, or that names a key twice in one object, is refused too: parsers disagree on which of
two values wins, and the gateway must judge the request that the point would see.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import jiter
import msgspec

from grifo.errors import InvalidRequestError

MAX_TOKENS_LIMIT = 1_048_576
MAX_DIMENSIONS = 65_536  # bounds what reaches an engine; models have a few thousand at most
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Stop = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
One = Annotated[int, msgspec.Meta(ge=1, le=1)]
Text = Annotated[str, msgspec.Meta(max_length=4 * 1024 * 1024)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


class StreamOptions(_Strict, kw_only=True):
    include_usage: bool = False


class TextPart(_Strict, tag_field="type", tag="text", kw_only=True):
    text: Text


class Message(_Strict, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], msgspec.Meta(max_length=256)] | None = None
    name: Annotated[str, msgspec.Meta(max_length=256)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Strict, kw_only=True):
    model: ModelName
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: One | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], msgspec.Meta(max_length=4)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=4096)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: Literal[False] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling, kw_only=True):
    prompt: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=1)]
    echo: Literal[False] | None = None
    logprobs: None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for legacy completions


class EmbeddingRequest(_Strict, kw_only=True):
    model: ModelName
    input: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=MAX_DIMENSIONS)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


AGENT_RUNS_PATH = "/v1/grifo/agent-runs"
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]
SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


class AgentLimits(_Strict, kw_only=True):
    max_steps: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    """Model steps (each a tool call or the final answer)."""
    max_tokens: MaxTokens = 16_384
    """Prompt plus completion tokens over every step of the run."""
    max_step_tokens: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 256
    """Completion tokens of one model step."""
    max_cost_usd: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None
    """Token price of the whole run at most this (the gateway caps `max_tokens` to it)."""


class AgentRunRequest(_Strict, kw_only=True):
    """`POST /v1/grifo/agent-runs`: a whole tool-using loop run at one point (README, Agents)."""

    model: ModelName
    input: Text | Annotated[list[Message], msgspec.Meta(min_length=1, max_length=4096)]
    instructions: Text = ""
    tools: Annotated[list[ToolName], msgspec.Meta(max_length=64)] = []
    tool_choice: Literal["auto", "required", "none"] = "auto"
    """required: every step but the last calls a tool; the last step always answers."""
    limits: AgentLimits = msgspec.field(default_factory=AgentLimits)
    session_id: SessionId | None = None
    """Runs and chats of one session stick to the point that served it while it is healthy."""
    temperature: Temperature | None = None
    seed: Seed | None = None
    stream: bool = True

    def messages(self) -> list[Message]:
        if isinstance(self.input, str):
            return [Message(role="user", content=self.input)]
        return list(self.input)

    def token_limit(self) -> int:
        return self.limits.max_tokens

    @property
    def include_usage(self) -> bool:
        return True


InferenceRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest | AgentRunRequest
T = TypeVar("T", ChatCompletionRequest, CompletionRequest, EmbeddingRequest, AgentRunRequest)

_DECODERS: dict[type, msgspec.json.Decoder[InferenceRequest]] = {
    kind: msgspec.json.Decoder(kind)
    for kind in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, AgentRunRequest)
}
_PATH = re.compile(r"at `\$\.?([A-Za-z_][A-Za-z0-9_]*)")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def decode(kind: type[T], body: bytes) -> T:
    """Decode and validate a request body, or raise InvalidRequestError naming the parameter."""
    request: T = decode_json(kind, body, _DECODERS[kind])  # type: ignore[assignment]
    return request


S = TypeVar("S", bound=msgspec.Struct)


def decode_json(kind: type[S], body: bytes, decoder: msgspec.json.Decoder[S] | None = None) -> S:
    """Any JSON body as the struct `kind` (with `decoder`, a cached one for it), refused the
    way every grifo request is: InvalidRequestError naming the parameter, duplicate keys and
    non-UTF-8 refused too."""
    if not body:
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        request = msgspec.json.decode(body, type=kind) if decoder is None else decoder.decode(body)
    except UnicodeDecodeError:  # msgspec checks UTF-8 inside strings only as it reads them
        raise InvalidRequestError(
            "the request body is not valid UTF-8 JSON", code="invalid_json"
        ) from None
    except msgspec.ValidationError as exc:
        message = str(exc)
        unknown = _UNKNOWN.search(message)
        if unknown:
            name = unknown.group(1)
            raise InvalidRequestError(
                f"unrecognized request argument supplied: {name}",
                param=name,
                code="unsupported_parameter",
            ) from None
        where = _PATH.search(message) or _MISSING.search(message)
        raise InvalidRequestError(
            f"invalid request: {message}", param=where.group(1) if where else None
        ) from None
    except msgspec.DecodeError:
        raise InvalidRequestError(
            "the request body is not valid JSON", code="invalid_json"
        ) from None
    _refuse_duplicate_keys(body)
    return request


def _refuse_duplicate_keys(body: bytes) -> None:
    """Raise InvalidRequestError naming a key given twice in one object. Runs only on a body
    that already decoded, so its size is one the request types allow. jiter (Rust) parses it a
    second time, about twice as fast as the standard library's `json` with a hook per object
    (bench/README.md); keys are compared decoded (`"model"` and `"\\u006dodel"` are one)."""
    try:
        jiter.from_json(body, catch_duplicate_keys=True, cache_mode="keys")
    except ValueError as exc:
        message = str(exc)
        if message.startswith(_DUPLICATE):
            name = message[len(_DUPLICATE) :].rpartition('" at line')[0]
            raise InvalidRequestError(
                f"duplicate key {name!r} in a JSON object: send each parameter once",
                param=name,
                code="duplicate_key",
            ) from None
        if message.startswith("recursion limit exceeded"):
            raise InvalidRequestError(
                "the request body nests JSON objects and arrays too deeply", code="invalid_json"
            ) from None
        # JSON the first decoder took and this one does not: refuse it too
        raise InvalidRequestError(
            "the request body is not valid JSON", code="invalid_json"
        ) from None


_DUPLICATE = 'Detected duplicate key "'


def encode(request: InferenceRequest) -> bytes:
    return msgspec.json.encode(request)


def decode_for(path: str, body: bytes) -> InferenceRequest:
    """Decode the body of a request to one of the inference routes."""
    if path == "/v1/chat/completions":
        return decode(ChatCompletionRequest, body)
    if path == "/v1/completions":
        return decode(CompletionRequest, body)
    if path == AGENT_RUNS_PATH:
        return decode(AgentRunRequest, body)
    return decode(EmbeddingRequest, body)


def upstream_body(request: InferenceRequest) -> bytes:
    """The allow-listed body for a point; streams always ask for usage so they can be metered."""
    if isinstance(request, ChatCompletionRequest | CompletionRequest) and request.stream:
        request = msgspec.structs.replace(request, stream_options=StreamOptions(include_usage=True))
    return encode(request)
