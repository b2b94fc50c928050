"""The server's protocol module on its own: request checks and response
bodies, with a stand-in tokenizer (one token per character), no model and no
server."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from trit import InvalidInputError, SamplingOptions
from trit.server.protocol import (
    APIError,
    PromptContext,
    Responses,
    TokenLogprob,
    TokenText,
    chat_logprobs,
    check_model,
    completion_logprobs,
    finish_reason,
    parse_chat,
    parse_completion,
    token_logprob,
    usage,
)

N_CTX, VOCAB = 64, 300
rendered: list[list[dict[str, Any]]] = []


def encode(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


def encode_chat(messages: list[dict[str, Any]]) -> list[int]:
    if any(m["content"] == "refuse me" for m in messages):
        raise InvalidInputError("the template refused")
    rendered.append(messages)
    return encode("".join(f"<{m['role']}>{m['content']}" for m in messages))


MAX_TOKEN_BYTES = 4  # the stand-in's tokens are single characters
CTX = PromptContext(N_CTX, VOCAB, MAX_TOKEN_BYTES, encode, encode_chat)
HI = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HI, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Hi", **fields}


def refused(parse: Any, body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body, CTX).tokenize()
    assert info.value.status == 400
    return info.value


def test_a_chat_request_gets_openai_defaults() -> None:
    req = parse_chat(chat(), CTX).tokenize()
    assert req.ids == encode("<user>Hi")
    assert req.max_tokens == N_CTX - len(req.ids)  # up to the end of the context
    assert req.sampling == SamplingOptions(temperature=1.0)  # OpenAI's default temperature
    assert (req.stream, req.include_usage, req.logprobs) == (False, False, None)


def test_a_completion_request_gets_openai_defaults() -> None:
    req = parse_completion(completion(), CTX).tokenize()
    assert req.ids == encode("Hi") and req.max_tokens == 16
    assert parse_completion(completion(prompt=[[1, 2, 3]]), CTX).tokenize().ids == [
        1,
        2,
        3,
    ]  # a batch of one
    assert parse_completion(completion(prompt=["Hi"]), CTX).tokenize().ids == encode("Hi")


def test_sampling_fields_become_sampling_options() -> None:
    req = parse_chat(
        chat(temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, seed=-1),
        CTX,
    )
    assert req.sampling == SamplingOptions(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        seed=(1 << 64) - 1,  # OpenAI's signed seed, as the same 64 bits
    )
    assert parse_chat(chat(stop="END"), CTX).tokenize().sampling.stop == ("END",)
    assert parse_chat(chat(stop=["a", "b"]), CTX).tokenize().sampling.stop == ("a", "b")


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": 1 << 64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 33}, "stop"),
        ({"stop": 5}, "stop"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": 3}, "stream_options"),
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -3}, "max_completion_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_a_bad_chat_field_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    err = refused(parse_chat, chat(**fields))
    assert err.param == param
    assert err.body()["error"]["param"] == param
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "Hi",
        ["Hi"],
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        [{"role": "user", "content": [{"type": "text", "text": 3}]}],
        [{"role": "user", "content": 3}],
        [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}],
        [{"role": "user", "content": "refuse me"}],
    ],
)
def test_bad_messages_are_refused(messages: Any) -> None:
    assert refused(parse_chat, chat(messages=messages)).param == "messages"


def test_messages_are_rendered_as_the_template_expects() -> None:
    rendered.clear()
    parse_chat(
        chat(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": []},
            ]
        ),
        CTX,
    ).tokenize()
    assert rendered == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "ab"},
            {"role": "assistant", "content": "ok"},
        ]
    ]


def test_unknown_null_fields_ask_for_nothing() -> None:
    assert (
        parse_chat(chat(tools=None, response_format=None, user="u"), CTX).tokenize().max_tokens > 0
    )


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"prompt": [1, VOCAB]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_a_bad_completion_field_is_refused_by_name(fields: dict[str, Any], param: str) -> None:
    assert refused(parse_completion, completion(**fields)).param == param


def test_a_prompt_longer_than_the_context_names_the_limit() -> None:
    err = refused(parse_completion, completion(prompt="x" * (N_CTX + 1)))
    assert err.code == "context_length_exceeded" and err.param == "prompt"
    assert f"maximum context length is {N_CTX} tokens" in err.message
    assert f"resulted in {N_CTX + 1} tokens" in err.message
    err = refused(parse_chat, chat(messages=[{"role": "user", "content": "x" * N_CTX}]))
    assert err.code == "context_length_exceeded" and err.param == "messages"
    # Without max_tokens a chat reply may fill the context, and gets one
    # token when the prompt already does.
    assert (
        parse_chat(chat(messages=[{"role": "user", "content": "x" * 50}]), CTX)
        .tokenize()
        .max_tokens
        == 8
    )
    full = [{"role": "user", "content": "x" * (N_CTX - len("<user>"))}]
    assert parse_chat(chat(messages=full), CTX).tokenize().max_tokens == 1


def test_logprob_requests() -> None:
    assert parse_chat(chat(logprobs=True), CTX).tokenize().logprobs == 0
    assert parse_chat(chat(logprobs=True, top_logprobs=3), CTX).tokenize().logprobs == 3
    assert parse_chat(chat(logprobs=False), CTX).tokenize().logprobs is None
    assert parse_completion(completion(logprobs=2), CTX).tokenize().logprobs == 2


def test_the_model_is_checked() -> None:
    check_model({"model": "m"}, "m")
    with pytest.raises(APIError) as info:
        check_model({"model": "other"}, "m")
    assert (info.value.status, info.value.code, info.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    with pytest.raises(APIError) as info:
        check_model({}, "m")
    assert (info.value.status, info.value.param) == (400, "model")


def test_token_logprob_is_the_log_softmax_of_the_raw_logits() -> None:
    logits = np.array([2.0, 0.5, -np.inf, 3.0, 1.0], np.float32)
    lp = token_logprob(0, logits, 3)
    x = logits.astype(np.float64)
    log_z = math.log(np.exp(x[np.isfinite(x)]).sum())
    assert lp.logprob == pytest.approx(2.0 - log_z, abs=1e-12)
    assert [t for t, _ in lp.top] == [3, 0, 4]  # best first
    assert lp.top[0][1] == pytest.approx(3.0 - log_z, abs=1e-12)
    assert token_logprob(2, logits, 0) == TokenLogprob(2, -9999.0, [])  # -inf is not JSON


def test_logprob_bodies() -> None:
    text = TokenText(lambda t: {1: b"He", 2: b"llo", 3: b"\xe2\x82"}[t])
    entries = [TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.5)]), TokenLogprob(3, -2.0, [])]
    assert chat_logprobs(entries, text) == {
        "content": [
            {
                "token": "He",
                "logprob": -0.5,
                "bytes": [72, 101],
                "top_logprobs": [
                    {"token": "He", "logprob": -0.5, "bytes": [72, 101]},
                    {"token": "llo", "logprob": -1.5, "bytes": [108, 108, 111]},
                ],
            },
            # A token that is part of a UTF-8 character: its bytes say which part.
            {"token": "\ufffd", "logprob": -2.0, "bytes": [226, 130], "top_logprobs": []},
        ],
        "refusal": None,
    }
    assert completion_logprobs(entries, text, 10) == {
        "tokens": ["He", "\ufffd"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"He": -0.5, "llo": -1.5}, {}],
        "text_offset": [10, 12],
    }


def test_response_bodies() -> None:
    r = Responses("m", "trit-0", 64)
    chunk = r.chat_chunk("c1", {"index": 0, "delta": {"content": "x"}}, 123)
    assert chunk == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 123,
        "model": "m",
        "system_fingerprint": "trit-0",
        "choices": [{"index": 0, "delta": {"content": "x"}}],
    }
    assert r.chat_chunk("c1", {}, 123)["choices"] == []  # the usage chunk's
    done = r.chat_completion("c2", "Hello", None, "stop", usage(3, 2), 5)
    assert done["object"] == "chat.completion"
    assert done["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert r.completion_chunk("c3", [], 7)["object"] == "text_completion"
    assert r.model_card(9) == {
        "id": "m",
        "object": "model",
        "created": 9,
        "owned_by": "trit",
        "max_model_len": 64,
    }
    assert [finish_reason(f) for f in ("eos", "stop", "length", "context")] == [
        "stop",
        "stop",
        "length",
        "length",
    ]


def test_an_api_error_has_openai_shape() -> None:
    err = APIError(503, "busy", type="server_error", code="server_busy")
    assert err.body() == {
        "error": {"message": "busy", "type": "server_error", "param": None, "code": "server_busy"}
    }
