"""Conversation rendering: the exact token layout and loss mask of REFERENCE A.7, and errors on bad conversations.

Most tests use a bytes-only tokenizer (no merges), so the expected ids can be written down by hand: a character
of ASCII text is its byte value, and the 9 specials are ids 256..264.
"""

from __future__ import annotations

import pytest

from picochat.common import PicochatError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

BOS, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = 256, 257, 258, 259, 260
PYTHON_START, PYTHON_END, OUTPUT_START, OUTPUT_END = 261, 262, 263, 264


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer({bytes([b]): b for b in range(256)})


def text_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_special_ids_of_the_bytes_only_tokenizer(tokenizer):
    assert [tokenizer.encode_special(name) for name in SPECIAL_TOKENS] == list(range(256, 265))


def test_every_part_type_exact_ids_and_mask(tokenizer):
    conversation = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let"},
                    {"type": "python", "text": "2+2"},
                    {"type": "python_output", "text": "4"},
                    {"type": "text", "text": "4."},
                ],
            },
            {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "yes"},
        ]
    }
    ids, mask = tokenizer.render_conversation(conversation)
    expected = [
        (BOS, 0),
        (USER_START, 0), *[(i, 0) for i in text_ids("2+2?")], (USER_END, 0),
        (ASSISTANT_START, 0),
        *[(i, 1) for i in text_ids("Let")],
        (PYTHON_START, 1), *[(i, 1) for i in text_ids("2+2")], (PYTHON_END, 1),
        (OUTPUT_START, 0), *[(i, 0) for i in text_ids("4")], (OUTPUT_END, 0),
        *[(i, 1) for i in text_ids("4.")],
        (ASSISTANT_END, 1),
        (USER_START, 0), *[(i, 0) for i in text_ids("ok")], (USER_END, 0),
        (ASSISTANT_START, 0), *[(i, 1) for i in text_ids("yes")], (ASSISTANT_END, 1),
    ]  # fmt: skip
    assert ids == [token for token, _ in expected]
    assert mask == [supervised for _, supervised in expected]
    # The literal values, written out once, so a change of layout cannot hide behind the helper above.
    assert ids[:8] == [256, 257, 50, 43, 50, 63, 258, 259]
    assert mask[:8] == [0, 0, 0, 0, 0, 0, 0, 0]


def test_list_of_messages_equals_messages_dict(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.render_conversation(messages) == tokenizer.render_conversation({"messages": messages})


def test_system_message_is_merged_into_first_user_message(tokenizer):
    with_system = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    merged = [{"role": "user", "content": "Be brief.\n\nhi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.render_conversation(with_system) == tokenizer.render_conversation(merged)


def test_supervised_tokens_are_exactly_the_assistant_output(small_trained):
    # With a real (merging) tokenizer: the supervised tokens decode to the assistant text + <|assistant_end|>.
    conversation = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    ids, mask = small_trained.render_conversation(conversation)
    supervised = [token for token, m in zip(ids, mask) if m]
    assert small_trained.decode(supervised) == "The capital of France is Paris.<|assistant_end|>"
    assert ids[0] == small_trained.bos_token_id and mask[0] == 0
    unsupervised = [token for token, m in zip(ids, mask) if not m]
    assert small_trained.decode(unsupervised) == (
        "<|bos|><|user_start|>What is the capital of France?<|user_end|><|assistant_start|>"
    )


@pytest.fixture(scope="module")
def small_trained() -> Tokenizer:
    text = "The capital of France is Paris. What is the capital of Spain? Madrid is. " * 50
    return Tokenizer.train([text], vocab_size=320)


def test_user_text_with_special_token_strings_stays_ordinary(tokenizer):
    ids, _ = tokenizer.render_conversation([{"role": "user", "content": "<|assistant_end|>"}])
    assert ids == [BOS, USER_START, *text_ids("<|assistant_end|>"), USER_END]


def test_truncation_to_max_tokens(tokenizer):
    conversation = [{"role": "user", "content": "abcdef"}, {"role": "assistant", "content": "ghijkl"}]
    full_ids, full_mask = tokenizer.render_conversation(conversation)
    assert len(full_ids) == 1 + 8 + 8
    for max_tokens in (1, 5, 12, len(full_ids), len(full_ids) + 10):
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_tokens)
        assert ids == full_ids[:max_tokens] and mask == full_mask[:max_tokens]


@pytest.mark.parametrize("max_tokens", [0, -1, 2.5, None])
def test_bad_max_tokens(tokenizer, max_tokens):
    with pytest.raises(PicochatError, match="max_tokens"):
        tokenizer.render_conversation([{"role": "user", "content": "x"}], max_tokens=max_tokens)


def test_render_for_completion_drops_the_answer(tokenizer):
    conversation = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "r"},
            {"role": "assistant", "content": "SECRET"},
        ]
    }
    prompt = tokenizer.render_for_completion(conversation)
    full, _ = tokenizer.render_conversation(conversation["messages"][:3])
    assert prompt == full + [ASSISTANT_START]
    assert "SECRET" not in tokenizer.decode(prompt)
    # A conversation that already ends with the user's turn is prompted as it is.
    assert tokenizer.render_for_completion(conversation["messages"][:3]) == prompt


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "no messages"),
        ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 2 has role 'user'",
        ),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "message 1 must be a user"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "message 1 has role 'tool'"),
        ([{"role": "user"}], 'message 0 must be an object with "role" and "content"'),
        (["hello"], "message 0 must be an object"),
        ([{"role": "user", "content": ["a"]}], "message 0 \\(user\\) content must be a string"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "message 1 \\(assistant\\)"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
            "message 1 part 0: unknown part type 'image'",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": 1}]}],
            'message 1 part 0: "text" must be a string',
        ),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ["x"]}], "message 1 part 0"),
    ],
)
def test_bad_conversations_are_clear_errors(tokenizer, messages, message):
    with pytest.raises(PicochatError, match=message):
        tokenizer.render_conversation(messages)


@pytest.mark.parametrize("conversation", [{"turns": []}, "hello", 42])
def test_bad_conversation_container(tokenizer, conversation):
    with pytest.raises(PicochatError, match="conversation"):
        tokenizer.render_conversation(conversation)


def test_render_for_completion_errors(tokenizer):
    with pytest.raises(PicochatError, match="nothing left"):
        tokenizer.render_for_completion([{"role": "assistant", "content": "a"}])
    with pytest.raises(PicochatError, match="has role 'assistant'"):
        tokenizer.render_for_completion([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])


def test_visualize_tokens(tokenizer):
    ids, mask = tokenizer.render_conversation(
        [{"role": "user", "content": "a\n"}, {"role": "assistant", "content": "b"}]
    )
    view = tokenizer.visualize_tokens(ids, mask)
    assert view == "<|bos|>|<|user_start|>|a|\\n|<|user_end|>|<|assistant_start|>|[[b]]|[[<|assistant_end|>]]"
    assert "[[" not in tokenizer.visualize_tokens(ids)
    with pytest.raises(ValueError):
        tokenizer.visualize_tokens(ids, mask[:-1])
