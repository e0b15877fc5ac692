"""Chat tasks on the real data: exact rendering (ids and loss masks) per task type, answer extraction and scoring,
HumanEval in the sandbox, spelling and identity generation. User files and mixtures: tests/test_tasks_conversations.py.
"""

from __future__ import annotations

import gzip
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from picochat.common import PicochatError
from picochat.tasks import ARC, GSM8K, MMLU, HumanEval, Identity, Spelling, shuffled, take
from picochat.tasks.common import CATEGORICAL, GENERATIVE, render_multiple_choice
from picochat.tasks.gsm8k import extract_answer, solution_parts
from picochat.tasks.humaneval import check_program, extract_code
from picochat.tokenizer import Tokenizer
from picochat.tools import calculator


@pytest.fixture(scope="module")
def tokenizer(data_dir) -> Tokenizer:
    """A small BPE trained on GSM8K questions and Alpaca answers (a few hundred KB)."""
    texts = [json.loads(line)["question"] for line in (data_dir / "chat_eval/gsm8k/train.jsonl").open()][:3000]
    texts += [row["output"] for row in json.loads((data_dir / "sft/alpaca_en_demo.json").read_text())]
    return Tokenizer.train(texts, vocab_size=512)


def specials(tokenizer: Tokenizer) -> dict[str, int]:
    names = ["bos", "user_start", "user_end", "assistant_start", "assistant_end"]
    names += ["python_start", "python_end", "output_start", "output_end"]
    return {name: tokenizer.encode_special(f"<|{name}|>") for name in names}


def expected_render(tokenizer: Tokenizer, user: str, assistant_parts: list[tuple[str, str]]):
    """The layout of REFERENCE A.7 for one exchange, written out: (ids, mask)."""
    s = specials(tokenizer)
    pairs = [(s["bos"], 0), (s["user_start"], 0)]
    pairs += [(i, 0) for i in tokenizer.encode(user)]
    pairs += [(s["user_end"], 0), (s["assistant_start"], 0)]
    for kind, text in assistant_parts:
        if kind == "text":
            pairs += [(i, 1) for i in tokenizer.encode(text)]
        elif kind == "python":
            pairs += [(s["python_start"], 1), *[(i, 1) for i in tokenizer.encode(text)], (s["python_end"], 1)]
        else:
            pairs += [(s["output_start"], 0), *[(i, 0) for i in tokenizer.encode(text)], (s["output_end"], 0)]
    pairs.append((s["assistant_end"], 1))
    return [token for token, _ in pairs], [supervised for _, supervised in pairs]


def raw_lines(path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Multiple choice: ARC and MMLU


def test_render_multiple_choice_format():
    text = render_multiple_choice("Which is red?", ["A", "B"], ["grass", "blood"])
    assert text == (
        "Multiple Choice question: Which is red?\n- grass=A\n- blood=B\n\n"
        "Respond only with the letter of the correct answer."
    )


def test_arc_sizes_and_exact_rendering(data_dir, tokenizer):
    sizes = {("easy", "train"): 2251, ("easy", "validation"): 570, ("easy", "test"): 2376}
    sizes |= {("challenge", "train"): 1119, ("challenge", "validation"): 299, ("challenge", "test"): 1172}
    for (subset, split), size in sizes.items():
        assert len(ARC(subset, split, data_dir=data_dir)) == size
    task = ARC("easy", "test", data_dir=data_dir)
    assert task.eval_type == CATEGORICAL and task.name == "ARC-Easy" and task.baseline == 0.25
    conversation = task[0]
    prompt = (
        "Multiple Choice question: Which statement best explains why photosynthesis is the foundation of most food "
        "webs?\n"
        "- Sunlight is the source of energy for nearly all ecosystems.=A\n"
        "- Most ecosystems are found on land instead of in water.=B\n"
        "- Carbon dioxide is more available than other gases.=C\n"
        "- The producers in all ecosystems are plants.=D\n"
        "\nRespond only with the letter of the correct answer."
    )
    assert conversation["messages"] == [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A"}]
    assert task.allowed_letters(conversation) == ["A", "B", "C", "D"]
    ids, mask = tokenizer.render_conversation(conversation)
    assert (ids, mask) == expected_render(tokenizer, prompt, [("text", "A")])
    # Only the answer letter and <|assistant_end|> are trained on.
    assert sum(mask) == len(tokenizer.encode("A")) + 1
    # The evaluation prompt is everything up to and including <|assistant_start|>.
    completion = tokenizer.render_for_completion(conversation)
    assert completion == ids[: len(completion)] and completion[-1] == specials(tokenizer)["assistant_start"]


def test_arc_numeric_labels_and_three_or_five_choices_become_letters(data_dir):
    rows = raw_lines(data_dir / "chat_eval/arc/ARC-Easy-test.jsonl")
    task = ARC("easy", "test", data_dir=data_dir)
    seen = set()
    for index, row in enumerate(rows):
        labels = row["choices"]["label"]
        conversation = task[index]
        letters = ["A", "B", "C", "D", "E"][: len(labels)]
        assert conversation["letters"] == letters
        assert conversation["answer"] == letters[labels.index(row["answerKey"])]
        assert conversation["messages"][1]["content"] == conversation["answer"]
        for letter, choice in zip(letters, row["choices"]["text"]):
            assert f"\n- {choice}={letter}\n" in conversation["messages"][0]["content"]
        seen.add((labels[0], len(labels)))
    assert {("1", 4), ("A", 3), ("A", 5), ("A", 4)} <= seen  # the quirks of this copy all occurred


def test_categorical_evaluation(data_dir):
    task = ARC("challenge", "validation", data_dir=data_dir)
    conversation = task[0]
    right = conversation["answer"]
    wrong = next(letter for letter in conversation["letters"] if letter != right)
    assert task.evaluate(conversation, right) and task.evaluate(conversation, f" {right}\n")
    assert not task.evaluate(conversation, wrong)
    assert task.reward(conversation, right) == 1.0 and task.reward(conversation, wrong) == 0.0


def test_mmlu_sizes_rendering_and_answers(data_dir, tokenizer):
    test = MMLU("test", data_dir=data_dir)
    dev = MMLU("dev", data_dir=data_dir)
    assert len(test) == 14042 and len(dev) == 285
    assert test.eval_type == CATEGORICAL and test.baseline == 0.25
    astronomy = MMLU("test", subjects=["astronomy"], data_dir=data_dir)
    conversation = astronomy[0]
    prompt = (
        'Multiple Choice question: What is true for a type-Ia ("type one-a") supernova?\n'
        "- This type occurs in binary systems.=A\n"
        "- This type occurs in young galaxies.=B\n"
        "- This type produces gamma-ray bursts.=C\n"
        "- This type produces high amounts of X-rays.=D\n"
        "\nRespond only with the letter of the correct answer."
    )
    assert conversation["messages"][0]["content"] == prompt
    assert conversation["answer"] == "A" and conversation["subject"] == "astronomy"  # the CSV says 0
    assert tokenizer.render_conversation(conversation) == expected_render(tokenizer, prompt, [("text", "A")])
    # Answers are the 0-based indices of the CSVs: every letter occurs, and nothing else.
    assert {test[i]["answer"] for i in range(0, len(test), 7)} == {"A", "B", "C", "D"}


def test_mmlu_few_shot_uses_same_subject_dev_questions(data_dir):
    zero = MMLU("test", subjects=["astronomy"], data_dir=data_dir)
    three = MMLU("test", subjects=["astronomy"], few_shot=3, data_dir=data_dir)
    dev = MMLU("dev", subjects=["astronomy"], data_dir=data_dir)
    messages = three[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4
    for shot in range(3):
        assert messages[2 * shot : 2 * shot + 2] == dev[shot]["messages"]
    assert messages[-2:] == zero[0]["messages"]
    # On the dev split itself, a question is never its own example.
    dev_few = MMLU("dev", subjects=["astronomy"], few_shot=5, data_dir=data_dir)
    assert len(dev_few[0]["messages"]) == 2 * 5
    assert dev[0]["messages"][0] not in dev_few[0]["messages"][:-2]
    with pytest.raises(PicochatError, match="unknown subject"):
        MMLU("test", subjects=["astrology"], data_dir=data_dir)


# ----------------------------------------------------------------------------------------------------------
# GSM8K


def test_gsm8k_tool_parts_and_exact_rendering(data_dir, tokenizer):
    task = GSM8K("test", data_dir=data_dir)
    assert len(task) == 1319 and len(GSM8K("train", data_dir=data_dir)) == 7473
    assert task.eval_type == GENERATIVE
    conversation = task[0]
    parts = conversation["messages"][1]["content"]
    expected_parts = [
        ("text", "Janet sells 16 - 3 - 4 = "),
        ("python", "16-3-4"),
        ("python_output", "9"),
        ("text", "9 duck eggs a day.\nShe makes 9 * 2 = $"),
        ("python", "9*2"),
        ("python_output", "18"),
        ("text", "18 every day at the farmer’s market.\n#### 18"),
    ]
    assert [(part["type"], part["text"]) for part in parts] == expected_parts
    question = conversation["messages"][0]["content"]
    assert question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert tokenizer.render_conversation(conversation) == expected_render(tokenizer, question, expected_parts)
    # The calculator the engine runs gives exactly the outputs the data shows.
    assert calculator("16-3-4") == "9" and calculator("9*2") == "18"


def test_gsm8k_answer_extraction_on_every_test_solution(data_dir):
    rows = raw_lines(data_dir / "chat_eval/gsm8k/test.jsonl")
    task = GSM8K("test", data_dir=data_dir)
    correct = 0
    for index, row in enumerate(rows):
        conversation = task[index]
        final_line = row["answer"].rsplit("\n", 1)[-1]
        assert final_line.startswith("#### ")
        expected = final_line[len("#### ") :].strip().replace(",", "")
        assert conversation["answer"] == expected
        # The conversation's parts are the solution: joined back with <<expression=result>> they give it exactly.
        rebuilt = ""
        for part in conversation["messages"][1]["content"]:
            rebuilt += {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}[part["type"]].format(part["text"])
        assert rebuilt == row["answer"]
        text_only = "".join(p["text"] for p in conversation["messages"][1]["content"] if p["type"] == "text")
        correct += task.evaluate(conversation, row["answer"]) and task.evaluate(conversation, text_only)
    assert correct == 1319


def test_gsm8k_extraction_rules_and_reward(data_dir):
    assert extract_answer("so the total is\n#### 1,234") == "1234"
    assert extract_answer("#### -5.") == "-5"
    assert extract_answer("#### 0.5 dollars") == "0.5"
    assert extract_answer("The answer is 42.") is None
    assert extract_answer("#### 7 and later #### 8") == "7"  # the first final-answer line counts
    task = GSM8K("test", data_dir=data_dir)
    conversation = task[0]  # answer 18
    assert task.reward(conversation, "Let me think.\n#### 18") == 1.0
    assert task.reward(conversation, "#### 18.") == 1.0
    assert task.reward(conversation, "#### 19") == 0.0
    assert task.reward(conversation, "18") == 0.0  # no final-answer line, no credit
    assert solution_parts("no tools here\n#### 3") == [{"type": "text", "text": "no tools here\n#### 3"}]
    with pytest.raises(PicochatError, match="not <<expression=result>>"):
        solution_parts("bad <<12>> annotation")


# ----------------------------------------------------------------------------------------------------------
# HumanEval


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail_in_the_sandbox(data_dir):
    task = HumanEval(data_dir)
    assert len(task) == 164 and task.eval_type == GENERATIVE
    conversations = list(task)
    # Answers as a model would write them: the whole function in a fenced block; the prompt with no body;
    # and (for some problems) only the body, which gets the prompt put in front of it.
    fenced = [(c, "Here you go:\n```python\n" + c["messages"][1]["content"] + "\n```\nDone.") for c in conversations]
    empty = [(c, c["prompt"]) for c in conversations]
    body_only = [(c, c["messages"][1]["content"][len(c["prompt"]) :]) for c in conversations[:16]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        passed = list(pool.map(lambda pair: task.evaluate(*pair), fenced + empty + body_only))
    assert sum(passed[:164]) == 164
    assert sum(passed[164:328]) == 0
    assert sum(passed[328:]) == 16


def test_humaneval_rendering_and_program_assembly(data_dir, tokenizer):
    programs = []
    task = HumanEval(data_dir, execute=lambda program: programs.append(program) or True)
    conversation = task[0]
    rows = raw_lines(data_dir / "chat_eval/humaneval/HumanEval.jsonl.gz")
    prompt = rows[0]["prompt"]
    solution = prompt + rows[0]["canonical_solution"]
    assert conversation["messages"] == [{"role": "user", "content": prompt}, {"role": "assistant", "content": solution}]
    assert tokenizer.render_conversation(conversation) == expected_render(tokenizer, prompt, [("text", solution)])
    assert task.evaluate(conversation, "```python\ndef has_close_elements(numbers, threshold):\n    return 1\n```")
    program = programs[-1]
    assert program.startswith("from typing import List\n")
    assert "def has_close_elements(numbers, threshold):\n    return 1\n" in program
    assert program.endswith(rows[0]["test"] + "\n\ncheck(has_close_elements)\n")
    assert check_program(conversation, "    return 1\n").count("def has_close_elements(") == 1


def test_extract_code():
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_code("```python\nunclosed = 1\n") == "unclosed = 1\n"
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"


# ----------------------------------------------------------------------------------------------------------
# Spelling


def test_spelling_is_deterministic_split_by_word_and_consistent_with_the_calculator(data_dir, tokenizer):
    train = Spelling("mixed", "train", size=300, seed=7, data_dir=data_dir)
    again = Spelling("mixed", "train", size=300, seed=7, data_dir=data_dir)
    other_seed = Spelling("mixed", "train", size=300, seed=8, data_dir=data_dir)
    test = Spelling("mixed", "test", size=300, seed=7, data_dir=data_dir)
    assert [train[i] for i in range(300)] == [again[i] for i in range(300)]
    assert [train[i] for i in range(300)] != [other_seed[i] for i in range(300)]
    assert train[5] == train[5]  # random access gives the same conversation as iteration
    assert not set(train.words) & set(test.words)
    assert 5000 < len(train.words) and 300 < len(test.words)  # common words of the reference text, not all 370K
    assert "aahed" not in train.words and "water" in train.words + test.words
    kinds = [train[i]["kind"] for i in range(300)]
    assert kinds.count("spell") == kinds.count("count") == 150
    for index in range(300):
        conversation = test[index]
        word, assistant = conversation["word"], conversation["messages"][1]["content"]
        if conversation["kind"] == "spell":
            assert "-".join(word) in assistant
            assert test.evaluate(conversation, assistant)
            assert not test.evaluate(conversation, assistant.replace("-".join(word), "-".join(word[::-1]) + "-x"))
            continue
        python, output = assistant[1], assistant[2]
        assert python["type"] == "python" and output["type"] == "python_output"
        # What the engine's calculator returns for the call is exactly the output the model is shown.
        assert calculator(python["text"]) == output["text"] == str(word.count(conversation["letter"]))
        text = "".join(part["text"] for part in assistant)
        assert test.evaluate(conversation, text) and test.reward(conversation, text) == 1.0
        assert not test.evaluate(conversation, f"#### {int(output['text']) + 1}")


def test_spelling_count_rendering(data_dir, tokenizer):
    task = Spelling("count", "train", size=20, data_dir=data_dir)
    conversation = task[3]
    parts = [(part["type"], part["text"]) for part in conversation["messages"][1]["content"]]
    assert [kind for kind, _ in parts] == ["text", "python", "python_output", "text"]
    word, letter = conversation["word"], conversation["letter"]
    assert parts[1][1] == f'"{word}".count("{letter}")'
    assert parts[3][1].endswith(f"#### {word.count(letter)}")
    expected = expected_render(tokenizer, conversation["messages"][0]["content"], parts)
    assert tokenizer.render_conversation(conversation) == expected


def test_spelling_without_reference_text_uses_all_words(data_dir):
    everything = Spelling("spell", "train", size=10, data_dir=data_dir, reference_files=[])
    assert "aahed" in everything.words and len(everything.words) > 200_000
    with pytest.raises(PicochatError, match="spelling kind"):
        Spelling("rhyme", data_dir=data_dir)


# ----------------------------------------------------------------------------------------------------------
# Identity


def test_identity_uses_the_chosen_name_and_creator_and_never_another_identity(tokenizer):
    task = Identity("Ada", "Jane Doe", size=400, seed=3)
    assert len(task) == 400
    conversations = [task[i] for i in range(400)]
    assert conversations == [Identity("Ada", "Jane Doe", size=400, seed=3)[i] for i in range(400)]
    replies = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "assistant"]
    questions = [m["content"] for c in conversations for m in c["messages"] if m["role"] == "user"]
    everything = "\n".join(replies)
    assert "Ada" in everything and "Jane Doe" in everything
    for foreign in ("nanochat", "Karpathy", "I am ChatGPT", "I'm ChatGPT", "developed by OpenAI", "{", "}"):
        assert foreign not in everything
    # The topics the brief asks for all occur.
    for question in ("What's your name?", "Who made you?", "What can you do?", "Are you ChatGPT?"):
        assert question in questions or question.lower().rstrip("?!.") in questions
    assert any("English" in reply for reply in replies)  # languages
    assert any("mistakes" in reply for reply in replies)  # limitations
    assert any(len(c["messages"]) >= 4 for c in conversations)  # multi-turn
    for conversation in conversations[:50]:
        ids, mask = tokenizer.render_conversation(conversation)
        assert sum(mask) > 0
    # No creator given: the model says it does not know, rather than inventing one.
    anonymous = Identity(size=200)
    replies = [m["content"] for i in range(200) for m in anonymous[i]["messages"] if m["role"] == "assistant"]
    assert any("picochat" in reply for reply in replies) and not any("made by" in reply for reply in replies)


def test_identity_from_the_users_file_with_placeholders(tmp_path):
    path = tmp_path / "me.json"
    records = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."}]
    path.write_text(json.dumps(records))
    task = Identity("Ada", "Jane", path=path)
    assert len(task) == 1
    assert task[0]["messages"][1]["content"] == "I am Ada, made by Jane."
    with pytest.raises(PicochatError, match=re.escape(f"{path}:1: uses the placeholder")):
        Identity("Ada", path=path)


def test_identity_accepts_the_shared_identity_file(data_dir):
    task = Identity("Ada", path=data_dir / "identity/identity_conversations.jsonl")
    assert len(task) == 996
    assert all(task[i]["messages"][-1]["role"] == "assistant" for i in range(len(task)))


# ----------------------------------------------------------------------------------------------------------
# Views, defaults, missing data


def test_views_take_and_shuffle_delegate_scoring(data_dir):
    task = GSM8K("test", data_dir=data_dir)
    first = take(task, 0, 10)
    assert len(first) == 10 and first[3] == task[3] and first[-1] == task[9]
    mixed = shuffled(task, seed=1)
    assert len(mixed) == len(task) and mixed[0] == task[mixed.indices[0]]
    assert shuffled(task, seed=1).indices == mixed.indices != shuffled(task, seed=2).indices
    conversation = mixed[0]
    assert mixed.evaluate(conversation, "#### " + conversation["answer"])
    with pytest.raises(IndexError):
        first[10]


def test_default_data_dir_and_missing_files(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_DATA_DIR", str(data_dir))
    assert len(GSM8K("test")) == 1319
    with pytest.raises(PicochatError, match=re.escape(str(tmp_path / "chat_eval/gsm8k/test.jsonl"))):
        GSM8K("test", data_dir=tmp_path)
    with pytest.raises(PicochatError, match="GSM8K split"):
        GSM8K("validation", data_dir=data_dir)


def test_malformed_task_files_name_the_file_and_line(tmp_path):
    arc = tmp_path / "chat_eval/arc"
    arc.mkdir(parents=True)
    good = {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"}
    bad = dict(good, answerKey="C")
    (arc / "ARC-Easy-test.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(PicochatError, match=r"ARC-Easy-test\.jsonl:3: \"answerKey\" 'C' is not one of the labels"):
        ARC("easy", "test", data_dir=tmp_path)
    gsm = tmp_path / "chat_eval/gsm8k"
    gsm.mkdir(parents=True)
    (gsm / "test.jsonl").write_text('{"question": "q", "answer": "4"}\n')
    with pytest.raises(PicochatError, match=r"test\.jsonl:1: field \"answer\" does not end with \"#### <number>\""):
        GSM8K("test", data_dir=tmp_path)
    (gsm / "train.jsonl").write_text('{"question": "q", "answer": "#### 4"}\nnot json\n')
    with pytest.raises(PicochatError, match=r"train\.jsonl:2: not valid JSON"):
        GSM8K("train", data_dir=tmp_path)
    mmlu = tmp_path / "chat_eval/mmlu/test"
    mmlu.mkdir(parents=True)
    (mmlu / "x_test.csv").write_text(
        'question,choice0,choice1,choice2,choice3,answer\n"multi\nline",a,b,c,d,1\nq,a,b,c,d,E\n'
    )
    with pytest.raises(PicochatError, match=r"x_test\.csv:4: field \"answer\" must be 0, 1, 2 or 3"):
        MMLU("test", data_dir=tmp_path)
    (mmlu / "x_test.csv").write_text("q,a,b,c,d,answer\n")
    with pytest.raises(PicochatError, match=r"x_test\.csv:1: expected the header"):
        MMLU("test", data_dir=tmp_path)
