"""The user's own conversation files (OpenAI messages, ShareGPT, Alpaca): conversion, rendering, every kind of bad
data with its file:line error, skip_invalid, the tool-turn and trailing-user policies; and training mixtures."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

import picochat.tasks.conversations as conversations_module
from picochat.common import PicochatError
from picochat.tasks import (
    BUILTIN_SOURCES,
    DEFAULT_SFT_MIX,
    Conversations,
    Task,
    TaskMixture,
    build_mixture,
    parse_mixture_spec,
)
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = "Hello there! How are you today? I am fine, thanks. What is two plus two? It is four. " * 40
    return Tokenizer.train([text], vocab_size=300)


@pytest.fixture
def warnings(monkeypatch) -> list[str]:
    """What conversations.py reports with warn() (captured directly: logging may be configured by other tests)."""
    messages: list[str] = []
    monkeypatch.setattr(conversations_module, "warn", messages.append)
    return messages


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def write_json(path, records) -> None:
    # One record per line after the "[" line, so record k starts on line k + 2.
    path.write_text("[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n", encoding="utf-8")


EXCHANGE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


# ----------------------------------------------------------------------------------------------------------
# Formats


def test_openai_jsonl_with_messages_or_bare_lists_and_tool_parts(tmp_path, tokenizer):
    path = tmp_path / "mine.jsonl"
    parts = [{"type": "text", "text": "Let me compute "}, {"type": "python", "text": "2+2"}]
    parts += [{"type": "python_output", "text": "4"}, {"type": "text", "text": "It is four."}]
    write_jsonl(
        path,
        [
            {"messages": [{"role": "system", "content": "Be brief."}, *EXCHANGE], "id": 7},
            EXCHANGE,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                       {"type": "text", "text": "2+2?"}]},
                          {"role": "assistant", "content": parts}]},
        ],
    )  # fmt: skip
    task = Conversations(path)
    assert len(task) == 3 and task.name == "mine.jsonl" and task.where(1) == f"{path}:2"
    assert task[0] == {"messages": [{"role": "system", "content": "Be brief."}, *EXCHANGE]}
    assert task[1] == {"messages": EXCHANGE}
    assert task[2]["messages"][0] == {"role": "user", "content": "What is 2+2?"}  # text parts joined
    assert task[2]["messages"][1]["content"] == parts
    # Rendering: exactly the tokenizer's layout; the tool call is trained on, its output is not.
    ids, mask = tokenizer.render_conversation(task[2])
    s = {name: tokenizer.encode_special(f"<|{name}|>") for name in ("python_start", "python_end", "output_start")}
    four = tokenizer.encode("4")
    at = ids.index(s["output_start"])
    assert ids[at : at + len(four) + 2] == [s["output_start"], *four, tokenizer.encode_special("<|output_end|>")]
    assert mask[at : at + len(four) + 2] == [0] * (len(four) + 2)
    assert mask[ids.index(s["python_start"])] == 1 and mask[ids.index(s["python_end"])] == 1
    # Conversations are copies: changing one does not change the task.
    task[0]["messages"].clear()
    assert len(task[0]["messages"]) == 3


def test_sharegpt_json(tmp_path):
    path = tmp_path / "share.json"
    write_json(
        path,
        [
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
             "system": "Be kind."},
            {"id": "x", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                                          {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                                          {"from": "gpt", "value": "d"}]},
        ],
    )  # fmt: skip
    task = Conversations(path)
    assert task[0]["messages"] == [{"role": "system", "content": "Be kind."}, *EXCHANGE]
    assert [m["role"] for m in task[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in task[1]["messages"]] == ["S", "a", "b", "c", "d"]


def test_alpaca_json_with_input_system_and_history(tmp_path):
    path = tmp_path / "alpaca.json"
    write_json(
        path,
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "And now?", "output": "Bye!", "system": "Be polite.", "history": [["Say hi.", "Hi!"]]},
        ],
    )
    task = Conversations(path)
    assert task[0]["messages"] == [
        {"role": "user", "content": "Translate to French.\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert task[1]["messages"][0]["content"] == "Say hi."
    assert [m["content"] for m in task[2]["messages"]] == ["Be polite.", "Say hi.", "Hi!", "And now?", "Bye!"]


def test_the_shared_sft_files_load(data_dir, warnings):
    sizes = {"alpaca_en_demo.json": 999, "gpteacher_roleplay.json": 3146, "gpteacher_toolformer.json": 7673}
    for name, size in sizes.items():
        assert len(Conversations(data_dir / "sft" / name)) == size
    assert warnings == []
    # fastchat's ShareGPT identity file and LLaMA-Factory's Alpaca one are formats a user may bring.
    assert len(Conversations(data_dir / "identity/fastchat_dummy_conversation.json")) == 500
    assert len(Conversations(data_dir / "identity/llamafactory_identity.json")) == 91


# ----------------------------------------------------------------------------------------------------------
# Bad data: one clear error naming the file and line


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]},
         "message 1 has role 'bot'; expected system, user or assistant"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
         "message 1 (assistant): empty content"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": []}]},
         "message 1 (assistant): empty content (no parts)"),
        ({"messages": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
         "message 1 (assistant): part 0 has unknown type 'image'; expected text, python, python_output"),
        ({"messages": [{"role": "user", "content": [{"type": "python", "text": "1+1"}]},
                       {"role": "assistant", "content": "2"}]},
         "message 0 (user): part 0 has unknown type 'python'; expected text"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}]},
         "content must be a string or a list of parts, got int"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         "message 1 is 'user' where 'assistant' was expected (roles must alternate user, assistant)"),
        ({"messages": [*EXCHANGE, {"role": "system", "content": "late"}, {"role": "assistant", "content": "x"}]},
         "message 2 is 'system' where 'user' was expected (a system message must come first)"),
        ({"messages": [{"role": "assistant", "content": "I start"}]},
         "message 0 is 'assistant' where 'user' was expected"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "the conversation has no assistant reply"),
        ({"messages": "Hi"}, 'field "messages" must be a list of messages'),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
         "conversations[1] is from 'robot'; expected human, gpt, system"),
        ({"instruction": "Do it", "input": "", "output": ""}, 'field "output": empty content'),
        ({"instruction": "Do it", "input": 3, "output": "ok"}, 'field "input" must be a string, got int'),
        ({"text": "a pretraining document"}, "unknown record format"),
        ("just a string", "expected a conversation record (a JSON object or list), got str"),
    ],
)  # fmt: skip
def test_bad_records_name_the_file_line_and_problem(tmp_path, record, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": EXCHANGE}) + "\n\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(PicochatError) as error:
        Conversations(path)
    assert str(error.value).startswith(f"{path}:3: ") and problem in str(error.value)
    assert "\n" not in str(error.value)


def test_files_that_are_not_json(tmp_path):
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text(json.dumps({"messages": EXCHANGE}) + "\n{not json\n")
    with pytest.raises(PicochatError, match=re.escape(f"{jsonl}:2: not valid JSON")):
        Conversations(jsonl)
    array = tmp_path / "broken.json"
    array.write_text(
        "[\n" + json.dumps({"messages": EXCHANGE}) + ",\n" + json.dumps({"messages": EXCHANGE}) + "\n{oops\n]"
    )
    with pytest.raises(PicochatError, match=re.escape(f"{array}:4: not valid JSON")):
        Conversations(array)
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text("\n" + json.dumps({"messages": EXCHANGE}))
    with pytest.raises(PicochatError, match=re.escape(f"{not_a_list}:2: expected a JSON list")):
        Conversations(not_a_list)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PicochatError, match=re.escape(f"{binary}: not UTF-8 text")):
        Conversations(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PicochatError, match="no conversations in the file"):
        Conversations(empty)
    with pytest.raises(PicochatError, match="conversation file not found"):
        Conversations(tmp_path / "missing.jsonl")
    with pytest.raises(PicochatError, match="unsupported conversation file"):
        (tmp_path / "notes.txt").write_text("hi")
        Conversations(tmp_path / "notes.txt")


def test_json_list_errors_name_the_line_of_the_record(tmp_path):
    path = tmp_path / "records.json"
    records = [{"messages": EXCHANGE}] * 4 + [{"messages": [{"role": "user", "content": ""}, EXCHANGE[1]]}]
    write_json(path, records)
    with pytest.raises(PicochatError, match=re.escape(f"{path}:6: message 0 (user): empty content")):
        Conversations(path)


def test_skip_invalid_leaves_bad_records_out_and_reports_counts(tmp_path, warnings):
    path = tmp_path / "mixed.jsonl"
    bad_role = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]}
    write_jsonl(path, [{"messages": EXCHANGE}, bad_role, {"messages": EXCHANGE}, {"instruction": "x", "output": ""}])
    task = Conversations(path, skip_invalid=True)
    assert len(task) == 2 and task.skipped == 2
    assert [task.where(i) for i in range(2)] == [f"{path}:1", f"{path}:3"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{path}: skipped 2 of 4 conversations with problems (first: {path}:2: message 1")
    all_bad = tmp_path / "all_bad.jsonl"
    write_jsonl(all_bad, [bad_role])
    with pytest.raises(PicochatError, match="none of the 1 records is a usable conversation"):
        Conversations(all_bad, skip_invalid=True)


# ----------------------------------------------------------------------------------------------------------
# Policies: tool turns of other formats, a final user message


def test_tool_turns_are_cut_before_the_first_one(tmp_path, warnings):
    path = tmp_path / "tools.json"
    call = {"from": "function_call", "value": '{"name": "f"}'}
    observation = {"from": "observation", "value": "{}"}
    write_json(
        path,
        [
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                               {"from": "human", "value": "c"}, call, observation, {"from": "gpt", "value": "d"}]},
            {"conversations": [{"from": "human", "value": "a"}, call, observation, {"from": "gpt", "value": "d"}]},
            {"messages": [*EXCHANGE, {"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
        ],
    )  # fmt: skip
    task = Conversations(path)
    assert len(task) == 2 and task.skipped == 1
    assert task[0]["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert task[1]["messages"] == EXCHANGE
    assert warnings == [
        f"{path}: 3 conversations have function-call / tool turns, which picochat's tools cannot run; each was cut "
        "before its first such turn, and 1 with no exchange left were left out"
    ]


def test_the_shared_glaive_and_identity_files_follow_the_policies(data_dir, warnings):
    glaive = Conversations(data_dir / "sft/glaive_toolcall_en_demo.json")
    assert len(glaive) + glaive.skipped == 300 and len(glaive) == 194
    for conversation in glaive:
        assert conversation["messages"][-1]["role"] == "assistant"
        assert all(m["role"] in ("user", "assistant") for m in conversation["messages"])
    identity = Conversations(data_dir / "identity/identity_conversations.jsonl")
    assert len(identity) == 996
    assert identity.where(87) == f"{data_dir / 'identity/identity_conversations.jsonl'}:88"
    assert all(conversation["messages"][-1]["role"] == "assistant" for conversation in identity)
    assert any("4 conversations ended on a user message, which was dropped" in w and ":88)" in w for w in warnings)


# ----------------------------------------------------------------------------------------------------------
# Mixtures


class Numbers(Task):
    """n conversations whose user text is "<name> <i>", for checking what a mixture picks."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> dict:
        return {
            "messages": [{"role": "user", "content": f"{self.name} {index}"}, {"role": "assistant", "content": "ok"}]
        }


def contents(mixture: TaskMixture) -> list[str]:
    return [mixture[i]["messages"][0]["content"] for i in range(len(mixture))]


def test_mixture_respects_epochs_exactly():
    mixture = TaskMixture([(Numbers("a", 50), 1), (Numbers("b", 20), 3), (Numbers("c", 40), 0.25)], seed=0)
    assert len(mixture) == 50 + 60 + 10
    counts = Counter(contents(mixture))
    assert all(counts[f"a {i}"] == 1 for i in range(50))
    assert all(counts[f"b {i}"] == 3 for i in range(20))
    picked = [i for i in range(40) if counts[f"c {i}"]]
    assert len(picked) == 10 and all(counts[f"c {i}"] == 1 for i in picked)  # a quarter, each at most once
    assert mixture.summary() == [
        {"task": "a", "conversations": 50, "epochs": 1.0, "in_mixture": 50},
        {"task": "b", "conversations": 20, "epochs": 3.0, "in_mixture": 60},
        {"task": "c", "conversations": 40, "epochs": 0.25, "in_mixture": 10},
    ]
    assert {mixture.source(i).name for i in range(len(mixture))} == {"a", "b", "c"}


def test_mixture_order_is_seeded_and_shuffled():
    entries = [(Numbers("a", 100), 2), (Numbers("b", 100), 1)]
    first = contents(TaskMixture(entries, seed=5))
    assert first == contents(TaskMixture(entries, seed=5))
    assert first != contents(TaskMixture(entries, seed=6))
    assert sorted(first) == sorted(contents(TaskMixture(entries, seed=6)))
    # Well mixed: every tenth of the order holds conversations of both tasks.
    for start in range(0, 300, 30):
        assert {text.split()[0] for text in first[start : start + 30]} == {"a", "b"}


def test_mixture_rejects_bad_epochs_and_empty_input():
    for epochs in (0, -1, float("nan"), float("inf"), "2", True):
        with pytest.raises(PicochatError, match="epochs must be a positive number"):
            TaskMixture([(Numbers("a", 3), epochs)])
    with pytest.raises(PicochatError, match="at least one task"):
        TaskMixture([])


def test_parse_mixture_spec():
    assert parse_mixture_spec("alpaca:1, gsm8k:4,identity:2,path/to/my.jsonl:3,extra.json") == [
        ("alpaca", 1.0),
        ("gsm8k", 4.0),
        ("identity", 2.0),
        ("path/to/my.jsonl", 3.0),
        ("extra.json", 1.0),
    ]
    assert parse_mixture_spec("spelling:0.5") == [("spelling", 0.5)]
    assert parse_mixture_spec("data/v1:2024.jsonl") == [("data/v1:2024.jsonl", 1.0)]  # a colon in a file name
    for spec, problem in [
        ("", "empty mixture spec"),
        ("alpaca:1,,gsm8k:2", "empty entry"),
        ("alpaca:1,", "empty entry"),
        ("gsm8k:lots", "epochs must be a positive number, got 'lots'"),
        ("gsm8k:0", "epochs must be a positive number"),
        ("gsm8k:-2", "epochs must be a positive number"),
        (":3", "no source before ':'"),
    ]:
        with pytest.raises(PicochatError, match=re.escape(problem)):
            parse_mixture_spec(spec)


def test_build_mixture_from_builtins_and_a_user_file(data_dir, tmp_path):
    mine = tmp_path / "mine.jsonl"
    write_jsonl(mine, [{"messages": EXCHANGE}] * 3)
    spec = f"gsm8k:2,identity:0.1,arc:1,{mine}:4"
    mixture = build_mixture(spec, data_dir=data_dir, seed=1, identity_name="Ada", identity_creator="Jane")
    assert [(row["task"], row["in_mixture"]) for row in mixture.summary()] == [
        ("GSM8K", 2 * 7473),
        ("identity", 100),
        ("ARC-Easy", 2251),
        ("ARC-Challenge", 1119),
        ("mine.jsonl", 12),
    ]
    again = build_mixture(spec, data_dir=data_dir, seed=1, identity_name="Ada", identity_creator="Jane")
    assert [mixture[i] for i in range(0, len(mixture), 97)] == [again[i] for i in range(0, len(again), 97)]
    identity_replies = [
        mixture[i]["messages"][1]["content"] for i in range(len(mixture)) if mixture.source(i).name == "identity"
    ]
    assert len(identity_replies) == 100 and any("Ada" in reply for reply in identity_replies)
    with pytest.raises(PicochatError, match=r"mixture source 'alpca': not a built-in source \(alpaca, "):
        build_mixture("alpca:1", data_dir=data_dir)
    with pytest.raises(PicochatError, match="conversation file not found"):
        build_mixture(f"{tmp_path / 'nope.jsonl'}:1", data_dir=data_dir)


def test_default_sft_mix_builds_and_every_builtin_loads(data_dir, tokenizer):
    mixture = build_mixture(DEFAULT_SFT_MIX, data_dir=data_dir)
    names = {row["task"] for row in mixture.summary()}
    assert {"alpaca", "code_alpaca", "identity", "GSM8K", "ARC-Easy", "spelling"} <= names
    for index in range(0, len(mixture), 101):  # every kind of conversation renders
        ids, mask = tokenizer.render_conversation(mixture[index])
        assert sum(mask) > 0
    in_default = {source for source, _ in parse_mixture_spec(DEFAULT_SFT_MIX)}
    remaining = [name for name in BUILTIN_SOURCES if name not in in_default]
    assert remaining == ["gpteacher_toolformer", "arc_easy", "arc_challenge"]
    assert len(build_mixture(",".join(remaining), data_dir=data_dir)) == 7673 + 2251 + 1119
