"""What of a chat the proxy may cut: long texts only, never structure; on the tiny tokenizer, and on the real Qwen
chat template with tools."""

from __future__ import annotations

import pytest

from draftapprox.serve.proxy import chat
from tests.conftest import tiny_tokenizer

from ..conftest import words


def test_only_long_user_tool_and_assistant_texts_may_be_cut():
    tokenizer = tiny_tokenizer(chat=True)
    messages = [{"role": "system", "content": words(300, seed=1)},
                {"role": "user", "content": words(300, seed=2)},
                {"role": "assistant", "content": words(20, seed=3)},
                {"role": "tool", "tool_call_id": "c1", "content": words(200, seed=4)},
                {"role": "user", "content": [{"type": "text", "text": words(12, seed=5)},
                                             {"type": "text", "text": words(150, seed=6)}]}]
    rendered = chat.render(tokenizer, messages)
    assert [(p.message, p.part, len(p.positions)) for p in rendered.pieces] == [(1, None, 300), (3, None, 200),
                                                                               (4, 1, 150)]
    ids = rendered.ids
    special = {i for i, t in enumerate(ids) if t in (tokenizer.bos_token_id, tokenizer.eos_token_id)}
    assert special <= rendered.protected()  # role markers and the generation prompt
    assert set(range(1, 301)) <= rendered.protected()  # the system prompt
    assert len(rendered.protected()) == len(ids) - 650


def test_rebuild_changes_only_the_cut_texts():
    tokenizer = tiny_tokenizer(chat=True)
    messages = [{"role": "user", "content": words(200, seed=2), "name": "ann"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": words(140, seed=3)}]}]
    rendered = chat.render(tokenizer, messages)
    first, second = rendered.pieces
    kept = rendered.protected() | set(first.positions[::2]) | set(second.positions)
    out, count = chat.rebuild(tokenizer, messages, rendered, kept)
    assert count == 1 and out[1] is messages[1]  # the second kept whole: the very same object
    assert out[0]["name"] == "ann" and out[0]["content"].split() == messages[0]["content"].split()[::2]
    assert messages[0]["content"] == words(200, seed=2)  # the caller's messages untouched


@pytest.mark.parametrize(("extra", "reason"), [
    ({}, None),
    ({"temperature": 0.2, "n": 2, "stop": ["x"], "max_completion_tokens": 4}, None),
    ({"tools": []}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs, top_logprobs"),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
])
def test_a_chat_goes_as_ids_only_when_a_completion_answers_it_the_same(extra, reason):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    found = chat.why_messages(body)
    assert (found is None) if reason is None else found.startswith(reason)


def test_tool_traffic_goes_as_messages():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert "tool" in chat.why_messages({"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]})
    assert "tool" in chat.why_messages({"messages": [{"role": "tool", "content": "r", "tool_call_id": "c"}]})
    image = {"type": "image_url", "image_url": {"url": "x"}}
    assert "multi-part" in chat.why_messages({"messages": [{"role": "user", "content": [image]}]})


@pytest.mark.real
def test_the_qwen_template_renders_tools_and_calls_as_structure():
    from transformers import AutoTokenizer

    from draftapprox.models import offline

    tokenizer = AutoTokenizer.from_pretrained(offline.fetch(offline.DRAFT.name))
    tools = [{"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                               "parameters": {"type": "object",
                                                              "properties": {"path": {"type": "string"}}}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}
    result = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(60))
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What does notes.txt say about foxes?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": result}]
    rendered = chat.render(tokenizer, messages, tools)
    text = tokenizer.decode(rendered.ids)
    assert "read_file" in text and "<tool_call>" in text and "notes.txt" in text  # tools and the call rendered
    assert [(p.message, p.part) for p in rendered.pieces] == [(3, None)]  # only the tool result is cut
    protected = tokenizer.decode([rendered.ids[i] for i in sorted(rendered.protected())])
    assert "read_file" in protected and '"path": "notes.txt"' in protected and "<tool_response>" in protected
    assert protected.rstrip().endswith("<|im_start|>assistant")  # the generation prompt
