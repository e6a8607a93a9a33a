"""OpenAI request bodies: decoding is the allow-list, and re-encoding sends only allowed fields."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from grifo.errors import InvalidRequestError
from grifo.wire.requests import (
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    decode,
    decode_json,
    encode,
)

CHAT: dict[str, Any] = {
    "model": "smollm2",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": "Hello.", "name": "bot"},
        {"role": "user", "content": "Again"},
    ],
    "max_tokens": 32,
    "max_completion_tokens": 16,
    "temperature": 0.7,
    "top_p": 0.9,
    "n": 1,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["\n\n", "END"],
    "seed": -(2**63),
    "presence_penalty": -2,
    "frequency_penalty": 2,
    "user": "u-1",
    "logprobs": False,
}
COMPLETION: dict[str, Any] = {
    "model": "smollm2",
    "prompt": ["Once upon a time"],
    "max_tokens": MAX_TOKENS_LIMIT,
    "stop": "\n",
    "echo": False,
    "seed": 2**63 - 1,
}
EMBEDDING: dict[str, Any] = {
    "model": "minilm",
    "input": ["a", "b"],
    "encoding_format": "base64",
    "dimensions": 384,
    "user": "u-2",
}


def body(base: dict[str, Any] | None = None, **changes: Any) -> bytes:
    data = dict(CHAT if base is None else base)
    data.update(changes)
    return json.dumps(data).encode()


# -- valid bodies ------------------------------------------------------------------------------
def test_chat_decodes() -> None:
    request = decode(ChatCompletionRequest, body())
    assert request.model == "smollm2"
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[1].text() == "Hi !"
    assert request.messages[2].name == "bot"
    assert request.token_limit() == 16  # max_completion_tokens wins over max_tokens
    assert request.stream is True
    assert request.include_usage is True
    assert request.stops() == ("\n\n", "END")
    assert request.seed == -(2**63)


def test_minimal_chat_has_defaults() -> None:
    request = decode(
        ChatCompletionRequest, b'{"model":"m","messages":[{"role":"user","content":"x"}]}'
    )
    assert request.stream is False
    assert request.include_usage is False
    assert request.token_limit() is None
    assert request.stops() == ()
    assert request.messages[0].text() == "x"


def test_completion_decodes() -> None:
    request = decode(CompletionRequest, body(COMPLETION))
    assert request.prompt_text() == "Once upon a time"
    assert request.token_limit() == MAX_TOKENS_LIMIT
    assert request.stops() == ("\n",)
    plain = decode(CompletionRequest, b'{"model":"m","prompt":"p"}')
    assert plain.prompt_text() == "p"
    assert plain.token_limit() == 16


def test_embedding_decodes() -> None:
    request = decode(EmbeddingRequest, body(EMBEDDING))
    assert request.texts() == ["a", "b"]
    assert request.encoding_format == "base64"
    single = decode(EmbeddingRequest, b'{"model":"m","input":"one"}')
    assert single.texts() == ["one"]
    assert single.encoding_format == "float"


# -- hostile bodies ----------------------------------------------------------------------------
def _message(**fields: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "x", **fields}]


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    ("max_tokens=-1", {"max_tokens": -1}, "max_tokens"),
    ("max_tokens=0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens=2**63", {"max_tokens": 2**63}, "max_tokens"),
    ("max_tokens=limit+1", {"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ("max_tokens='100'", {"max_tokens": "100"}, "max_tokens"),
    ("max_tokens=true", {"max_tokens": True}, "max_tokens"),
    ("max_tokens=1.5", {"max_tokens": 1.5}, "max_tokens"),
    ("max_completion_tokens=0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("temperature='NaN'", {"temperature": "NaN"}, "temperature"),
    ("temperature=1e9", {"temperature": 1e9}, "temperature"),
    ("temperature=-1", {"temperature": -1}, "temperature"),
    ("top_p=2", {"top_p": 2}, "top_p"),
    ("presence_penalty=3", {"presence_penalty": 3}, "presence_penalty"),
    ("stream='false'", {"stream": "false"}, "stream"),
    ("stream=0", {"stream": 0}, "stream"),
    ("messages={}", {"messages": {}}, "messages"),
    ("messages=[]", {"messages": []}, "messages"),
    ("messages=null", {"messages": None}, "messages"),
    ("role=root", {"messages": [{"role": "root", "content": "x"}]}, "messages"),
    ("content=7", {"messages": [{"role": "user", "content": 7}]}, "messages"),
    ("image part", {"messages": _message(content=[{"type": "image_url"}])}, "messages"),
    ("n=2", {"n": 2}, "n"),
    ("n=0", {"n": 0}, "n"),
    ("stop x5", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop=''", {"stop": ""}, "stop"),
    ("model=''", {"model": ""}, "model"),
    ("model=1", {"model": 1}, "model"),
    ("logprobs=true", {"logprobs": True}, "logprobs"),
    ("seed=2**63", {"seed": 2**63}, "seed"),
    ("stream_options={'x':1}", {"stream_options": {"x": 1}}, "x"),
]


@pytest.mark.parametrize(
    ("changes", "param"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_field_is_rejected_naming_the_parameter(
    changes: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode(ChatCompletionRequest, body(**changes))
    assert info.value.param == param
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    envelope = json.loads(info.value.envelope())
    assert envelope["error"]["param"] == param


@pytest.mark.parametrize("name", ["api_base", "base_url", "n_discard", "grammar", "tools"])
def test_unknown_field_is_unsupported_parameter(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode(ChatCompletionRequest, body(**{name: "http://evil.example"}))
    assert info.value.param == name
    assert info.value.code == "unsupported_parameter"
    assert name in info.value.message


def test_unknown_field_inside_a_message_is_unsupported_parameter() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode(ChatCompletionRequest, body(messages=_message(tool_calls=[])))
    assert info.value.param == "tool_calls"
    assert info.value.code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (CompletionRequest, "echo", True),
        (CompletionRequest, "prompt", []),
        (CompletionRequest, "prompt", ["a", "b"]),
        (CompletionRequest, "logprobs", 1),
        (EmbeddingRequest, "input", []),
        (EmbeddingRequest, "encoding_format", "int8"),
        (EmbeddingRequest, "dimensions", 0),
        (EmbeddingRequest, "dimensions", 65_537),
        (EmbeddingRequest, "dimensions", 2**70),
    ],
)
def test_hostile_completion_and_embedding_fields(
    kind: type[CompletionRequest | EmbeddingRequest], field: str, value: Any
) -> None:
    base = COMPLETION if kind is CompletionRequest else EMBEDDING
    with pytest.raises(InvalidRequestError) as info:
        decode(kind, body(base, **{field: value}))
    assert info.value.param == field


def test_max_tokens_beyond_float_range() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1e309}'
    with pytest.raises(InvalidRequestError) as info:
        decode(ChatCompletionRequest, raw)
    assert info.value.param == "max_tokens"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"1e309", b"-1e309"])
def test_non_finite_temperature(literal: bytes) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":' + literal + b"}"
    with pytest.raises(InvalidRequestError):
        decode(ChatCompletionRequest, raw)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_request"),
        (b"{", "invalid_json"),
        (b'{"model": "m",}', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"[]", "invalid_request"),
        (b'[{"model":"m"}]', "invalid_request"),
        (b'"a string"', "invalid_request"),
        (b"null", "invalid_request"),
        (b"{}", "invalid_request"),
    ],
)
def test_not_a_request_object(raw: bytes, code: str) -> None:
    for kind in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        with pytest.raises(InvalidRequestError) as info:
            decode(kind, raw)
        assert info.value.code == code


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        (ChatCompletionRequest, b'{"model":"m\xff","messages":[{"role":"user","content":"x"}]}'),
        (ChatCompletionRequest, b'{"model":"m","messages":[{"role":"user","content":"\xc0\xaf"}]}'),
        (CompletionRequest, b'{"model":"m","prompt":"\xed\xa0\x80"}'),
        (EmbeddingRequest, b'{"model":"m","input":["ok","\x80"]}'),
    ],
    ids=["model", "overlong", "encoded-surrogate", "continuation-byte"],
)
def test_invalid_utf8_is_invalid_json_not_a_crash(
    kind: type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest], raw: bytes
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode(kind, raw)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model":"a","model":"m","messages":[{"role":"user","content":"x"}]}', "model"),
        (b'{"model":"m","messages":[{"role":"user","role":"system","content":"x"}]}', "role"),
        (
            b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a",'
            b'"text":"b"}]}]}',
            "text",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"x"}],'
            b'"stream_options":{"include_usage":true,"include_usage":false}}',
            "include_usage",
        ),
    ],
    ids=["top-level", "message", "text-part", "stream_options"],
)
def test_a_key_given_twice_is_refused_naming_it(raw: bytes, param: str) -> None:
    """Decoders disagree on which of two values wins (msgspec keeps the last); the gateway
    must judge exactly what a point would see, so it takes neither."""
    with pytest.raises(InvalidRequestError) as info:
        decode(ChatCompletionRequest, raw)
    assert info.value.param == param
    assert info.value.code == "duplicate_key"


def test_the_same_key_in_different_objects_is_fine() -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]}'
    assert len(decode(ChatCompletionRequest, raw).messages) == 2


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model":"m"}', "messages"),
        (b'{"messages":[{"role":"user","content":"x"}]}', "model"),
    ],
    ids=["messages", "model"],
)
def test_missing_required_field_names_it(raw: bytes, param: str) -> None:
    """OpenAI answers a missing required parameter with `param` set to it; so must we."""
    with pytest.raises(InvalidRequestError) as info:
        decode(ChatCompletionRequest, raw)
    assert info.value.param == param


# -- re-encoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "data"),
    [(ChatCompletionRequest, CHAT), (CompletionRequest, COMPLETION), (EmbeddingRequest, EMBEDDING)],
    ids=["chat", "completion", "embedding"],
)
def test_encode_keeps_every_allowed_field_and_nothing_else(
    kind: type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest], data: dict[str, Any]
) -> None:
    encoded = encode(decode(kind, json.dumps(data).encode()))
    again = msgspec.json.decode(encoded)
    # Nothing allowed is dropped (defaults like `logprobs: false` may be omitted) ...
    for name, value in data.items():
        if name in again:
            assert again[name] == value, name
        else:
            assert value in (False, None), f"{name} was dropped"
    # ... nothing unknown is added, and it decodes back to the same request.
    assert set(again) <= set(data)
    assert set(again) <= set(kind.__struct_fields__)
    assert decode(kind, encoded) == decode(kind, json.dumps(data).encode())


def test_encode_drops_nothing_allowed_for_the_full_chat() -> None:
    again = msgspec.json.decode(encode(decode(ChatCompletionRequest, body())))
    expected = {k: v for k, v in CHAT.items() if k != "logprobs"}
    assert {k: again[k] for k in expected} == expected
    assert "logprobs" not in again or again["logprobs"] is False


# -- duplicate keys ------------------------------------------------------------------------------
class _FreeForm(msgspec.Struct, forbid_unknown_fields=True):
    data: dict[str, Any]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"data": {"a": 1, "b": {"x": 1, "y": 2, "x": 3}}}', "x"),
        (b'{"data": {"\\u0061": 1, "a": 2}}', "a"),  # escaped and plain: one key
        (b'{"data": {}, "data": {}}', "data"),
        (b'{"data": {"": 1, "": 2}}', ""),
        (b'{"data": {"q\\"uote": 1, "q\\"uote": 2}}', "uote"),  # named as escaped
    ],
)
def test_a_key_twice_in_any_object_is_refused_by_name(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        decode_json(_FreeForm, raw)
    assert refused.value.code == "duplicate_key"
    assert refused.value.param is not None
    assert refused.value.param.endswith(param)


def test_the_same_key_in_nested_free_form_objects_is_fine() -> None:
    raw = b'{"data": {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}}'
    assert decode_json(_FreeForm, raw).data["b"][1] == {"a": 2}


def test_nesting_deeper_than_the_duplicate_check_follows_is_a_clear_400() -> None:
    deep = b'{"a": ' * 300 + b"1" + b"}" * 300
    with pytest.raises(InvalidRequestError, match="too deeply") as refused:
        decode_json(_FreeForm, b'{"data": ' + deep + b"}")
    assert refused.value.code == "invalid_json"
