"""Data sources: local file formats, OASST threads, the embedded corpora, dataset specs, the split,
and the cleaning before it (duplicates and empty responses dropped and counted; the cleaning
tests are part of the fault campaign, ``pytest -m faults``)."""

from __future__ import annotations

import itertools
import json
import logging
import random

import numpy as np
import pytest
import yaml

from qlora_jax import assets
from qlora_jax.data import (
    DatasetError,
    Example,
    clean_examples,
    detect_format,
    eval_count,
    load_chatterbot,
    load_chitchat,
    load_examples,
    load_file,
    make_example,
    split_indices,
    train_eval_split,
)


def write_jsonl(path, rows, blank_lines_after=()):
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if i in blank_lines_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def conversation(example: Example) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in example.messages]


# ---------------------------------------------------------------------------------------- formats
def test_alpaca_rows_become_one_exchange(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "output": "Hi!"},
    ]
    for path in (tmp_path / "a.json", tmp_path / "a.jsonl"):
        path.write_text(json.dumps(rows) if path.suffix == ".json" else "\n".join(map(json.dumps, rows)))
        examples = load_file(path)
        assert [conversation(e) for e in examples] == [
            [("user", "Name a colour."), ("assistant", "Blue.")],
            [("user", "Translate to French.\n\ncat"), ("assistant", "chat")],
            [("user", "Say hi."), ("assistant", "Hi!")],
        ]


def test_messages_and_input_output_rows(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}])
    assert [conversation(e) for e in load_file(path)] == [[(m["role"], m["content"]) for m in chat]]
    path = write_jsonl(tmp_path / "io.jsonl", [{"input": "Q", "output": "A"}])
    assert [conversation(e) for e in load_file(path)] == [[("user", "Q"), ("assistant", "A")]]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}])
    assert [conversation(e)[1][1] for e in load_file(path)] == ["A1", "A2"]


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "x", "input": "", "output": "y"}, "alpaca"),
    ({"input": "x", "output": "y"}, "input-output"),
    ({"messages": []}, "messages"),
    ({"message_id": "a", "parent_id": None, "role": "prompter", "text": "hi"}, "oasst"),
    ({"role": "prompter", "text": "hi", "replies": []}, "oasst"),
    ({"message_tree_id": "t", "prompt": {"role": "prompter", "text": "hi"}}, "oasst"),
])
def test_detect_format(row, expected):
    assert detect_format(row, "f.jsonl:1") == expected


def test_detect_format_rejects_ambiguous_and_unknown_rows():
    with pytest.raises(DatasetError, match=r"f\.jsonl:1: the first row matches several .*alpaca, messages"):
        detect_format({"instruction": "x", "output": "y", "messages": []}, "f.jsonl:1")
    with pytest.raises(DatasetError, match=r"f\.jsonl:1: cannot tell the dataset format .*'prompt', 'response'"):
        detect_format({"prompt": "x", "response": "y"}, "f.jsonl:1")


# A bad row in every format: (format, rows, bad row number in JSONL (1-based line), its index in
# JSON, what the message must say).
BAD_ROWS = [
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}], "missing field 'output'"),
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}],
     "field 'instruction' must be a string, got int"),
    ("input-output", [{"input": "a", "output": "b"}, {"input": "a", "output": None}], "missing field 'output'"),
    ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                  {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
     r"messages\[1\]: role 'bot' is not one of system, user, assistant"),
    ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                  {"messages": [{"role": "user", "content": "a"}]}], "no assistant message"),
    ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                  ["not", "an", "object"]], "expected a JSON object, got list"),
    ("oasst", [{"message_id": "1", "parent_id": None, "role": "prompter", "text": "q"},
               {"message_id": "2", "parent_id": "1", "role": "assistant"}], "missing field 'text'"),
    ("oasst", [{"message_id": "1", "parent_id": None, "role": "prompter", "text": "q"},
               {"message_id": "2", "parent_id": "1", "role": "robot", "text": "a"}], "role 'robot' is not"),
]


@pytest.mark.parametrize("format_name, rows, problem", BAD_ROWS)
@pytest.mark.parametrize("auto", [False, True])
def test_bad_jsonl_row_names_file_and_line(tmp_path, format_name, rows, problem, auto):
    # A blank line after the first row: the bad row is on line 3 of the file.
    path = write_jsonl(tmp_path / "data.jsonl", rows, blank_lines_after=(0,))
    with pytest.raises(DatasetError, match=f"^{path}:3: .*{problem}"):
        load_file(path, "auto" if auto else format_name)


@pytest.mark.parametrize("format_name, rows, problem", BAD_ROWS)
def test_bad_json_row_names_file_and_index(tmp_path, format_name, rows, problem):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(DatasetError, match=f"^{path}\\[1\\]: .*{problem}"):
        load_file(path, format_name)


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"input": "a", "output": "b"}, '{"input": "a", "output": '])
    with pytest.raises(DatasetError, match=f"^{path}:2: not valid JSON"):
        load_file(path)
    path = tmp_path / "data.json"
    path.write_text('{"rows": [1, 2]}')
    with pytest.raises(DatasetError, match=f"^{path}: expected a JSON array of rows"):
        load_file(path)


def test_bad_nested_oasst_node_names_row_and_path(tmp_path):
    tree = {"role": "prompter", "text": "q", "replies": [
        {"role": "assistant", "text": "a", "replies": []},
        {"role": "assistant", "text": "b", "replies": [{"role": "prompter", "replies": []}]},
    ]}
    path = write_jsonl(tmp_path / "trees.jsonl", [{"prompt": {"role": "prompter", "text": "x"}}, {"prompt": tree}])
    with pytest.raises(DatasetError, match=rf"^{path}:2: prompt: replies\[1\]\.replies\[0\]: missing field 'text'"):
        load_file(path)


# ---------------------------------------------------------------------------------------- OASST
# A hand-written tree (ranks: 0 is best):
#   P1 "What is 2+2?"
#   ├── A1 "4" (rank 1)
#   │   └── P2 "Why?"                      (prompter leaf: trimmed)
#   ├── A2 "Four." (rank 0)
#   │   ├── P3 "And 3+3?"
#   │   │   ├── A3 "6" (rank null)
#   │   │   └── A4 "Six." (rank 0)
#   │   └── P4 "Thanks" (deleted)          (dropped with its replies)
#   │       └── A5 "You're welcome"
#   └── A6 "5" (review_result false)       (dropped)
FLAT = [
    {"message_id": "P1", "parent_id": None, "role": "prompter", "text": "What is 2+2?"},
    {"message_id": "A1", "parent_id": "P1", "role": "assistant", "text": "4", "rank": 1},
    {"message_id": "P2", "parent_id": "A1", "role": "prompter", "text": "Why?"},
    {"message_id": "A2", "parent_id": "P1", "role": "assistant", "text": "Four.", "rank": 0},
    {"message_id": "P3", "parent_id": "A2", "role": "prompter", "text": "And 3+3?"},
    {"message_id": "A3", "parent_id": "P3", "role": "assistant", "text": "6", "rank": None},
    {"message_id": "A4", "parent_id": "P3", "role": "assistant", "text": "Six.", "rank": 0},
    {"message_id": "P4", "parent_id": "A2", "role": "prompter", "text": "Thanks", "deleted": True},
    {"message_id": "A5", "parent_id": "P4", "role": "assistant", "text": "You're welcome"},
    {"message_id": "A6", "parent_id": "P1", "role": "assistant", "text": "5", "review_result": False},
    # A second tree: a lone prompt without replies yields nothing.
    {"message_id": "Q1", "parent_id": None, "role": "prompter", "text": "Anyone?"},
]
TOP_RANKED = [[("user", "What is 2+2?"), ("assistant", "Four."), ("user", "And 3+3?"), ("assistant", "Six.")]]
ALL_LEAVES = [
    [("user", "What is 2+2?"), ("assistant", "4")],
    [("user", "What is 2+2?"), ("assistant", "Four."), ("user", "And 3+3?"), ("assistant", "6")],
    [("user", "What is 2+2?"), ("assistant", "Four."), ("user", "And 3+3?"), ("assistant", "Six.")],
]


def nested(message_id: str) -> dict:
    row = next(r for r in FLAT if r["message_id"] == message_id)
    node = {k: v for k, v in row.items() if k != "parent_id"}
    node["replies"] = [nested(r["message_id"]) for r in FLAT if r["parent_id"] == message_id]
    return node


@pytest.mark.parametrize("policy, expected", [("top_ranked", TOP_RANKED), ("all_leaves", ALL_LEAVES)])
def test_oasst_flat_rows_rebuild_threads_in_any_order(tmp_path, policy, expected):
    rows = list(FLAT)
    random.Random(0).shuffle(rows)
    # Shuffling changes the file order of A3/A4 siblings, which only matters for rank ties: none here.
    path = write_jsonl(tmp_path / "oasst.jsonl", rows)
    threads = sorted(conversation(e) for e in load_file(path, "oasst", oasst_policy=policy))
    assert threads == sorted(expected)


@pytest.mark.parametrize("policy, expected", [("top_ranked", TOP_RANKED), ("all_leaves", ALL_LEAVES)])
@pytest.mark.parametrize("wrapped", [False, True])
def test_oasst_nested_trees_give_the_same_threads(tmp_path, policy, expected, wrapped):
    trees = [nested("P1"), nested("Q1")]
    rows = [{"message_tree_id": t["message_id"], "prompt": t} for t in trees] if wrapped else trees
    path = write_jsonl(tmp_path / "trees.jsonl", rows)
    assert sorted(conversation(e) for e in load_file(path, oasst_policy=policy)) == sorted(expected)


def test_oasst_rank_ties_follow_file_order_and_unranked_come_last(tmp_path):
    rows = [
        {"message_id": "P", "parent_id": None, "role": "prompter", "text": "q"},
        {"message_id": "U", "parent_id": "P", "role": "assistant", "text": "unranked"},
        {"message_id": "B", "parent_id": "P", "role": "assistant", "text": "first of rank 2", "rank": 2},
        {"message_id": "C", "parent_id": "P", "role": "assistant", "text": "second of rank 2", "rank": 2},
    ]
    path = write_jsonl(tmp_path / "o.jsonl", rows)
    assert [conversation(e) for e in load_file(path)] == [[("user", "q"), ("assistant", "first of rank 2")]]


def test_oasst_structural_errors(tmp_path):
    orphan = [FLAT[0], {"message_id": "X", "parent_id": "nope", "role": "assistant", "text": "a"}]
    path = write_jsonl(tmp_path / "o.jsonl", orphan)
    with pytest.raises(DatasetError, match=f"^{path}:2: parent_id 'nope' is not a message_id in the file"):
        load_file(path)
    duplicate = [FLAT[0], FLAT[1], dict(FLAT[1], text="again")]
    path = write_jsonl(tmp_path / "o.jsonl", duplicate)
    with pytest.raises(DatasetError, match=f"^{path}:3: message_id 'A1' repeats {path}:2"):
        load_file(path)
    mixed = [FLAT[0], nested("P1")]
    path = write_jsonl(tmp_path / "o.jsonl", mixed)
    with pytest.raises(DatasetError, match=f"^{path}:2: a nested OASST tree"):
        load_file(path)


# ---------------------------------------------------------------------------------------- corpora
def test_chatterbot_english_counts_and_content():
    raw = []
    for path in sorted(assets.chatterbot_corpus_dir().glob("*.yml")):
        raw += [(path.name, i, c) for i, c in enumerate(yaml.safe_load(path.read_text())["conversations"])]
    assert len(raw) == 2026
    valid = [(name, i, c) for name, i, c in raw if isinstance(c, list) and all(isinstance(s, str) for s in c)]
    # The one malformed entry: YAML folded a question and its answer into one string.
    assert [(name, i) for name, i, c in raw if not isinstance(c, list)] == [("trivia.yml", 13)]
    examples = load_chatterbot()
    assert len(examples) == len(valid) == 2025
    for example, (name, index, texts) in zip(examples, valid, strict=True):
        kept = len(texts) // 2 * 2
        assert conversation(example) == [("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(texts[:kept])]
        assert example.origin.endswith(f"{name}: conversations[{index}]")


def test_chitchat_counts_and_content():
    raw = json.loads(assets.chitchat_dataset_file().read_text())
    assert len(raw) == 7168
    assert sum(len(c["messages"]) >= 2 for c in raw.values()) == 4018

    def speaker_runs(turns):
        non_empty = [t for t in turns if any(m["text"].strip() for m in t)]
        return [list(run) for _, run in itertools.groupby(non_empty, key=lambda t: t[0]["sender"])]

    # Twelve turns have no text; dropping them leaves one conversation with a single speaker.
    expected = [key for key, c in raw.items() if len(speaker_runs(c["messages"])) >= 2]
    assert len(expected) == 4017
    examples = load_chitchat()
    assert [e.origin.rsplit(": ", 1)[1] for e in examples] == expected
    first = raw["a07edb12-6b91-4138-b11e-02421888d699"]["messages"]
    turns = [" ".join(m["text"].strip() for m in turn) for turn in first]
    assert turns[0] == "Hello How are you doing today?"
    assert conversation(examples[0]) == [
        ("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(turns[: len(turns) // 2 * 2])
    ]
    for example in examples:
        roles = [m["role"] for m in example.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_dataset_specs(tmp_path):
    assert len(load_examples("chatterbot")) == 2025
    assert len(load_examples("chatterbot:spanish")) > 0
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    assert conversation(load_examples(str(path), "alpaca")[0]) == [("user", "a"), ("assistant", "b")]
    with pytest.raises(DatasetError, match="unknown dataset 'tatsu-lab/alpaca': expected chatterbot or chitchat"):
        load_examples("tatsu-lab/alpaca")
    with pytest.raises(ValueError, match="applies to local files only"):
        load_examples("chitchat", "alpaca")
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        load_examples(str(path), "csv")
    csv = tmp_path / "x.csv"
    csv.write_text("input,output\na,b\n")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        load_examples(str(csv))


# ---------------------------------------------------------------------------------------- split
def test_eval_count():
    assert eval_count(100, 10) == 10
    assert eval_count(101, 0.1) == 11  # rounded up, as datasets' train_test_split does
    assert eval_count(100, 0) == 0
    with pytest.raises(ValueError, match="leaving none to train on"):
        eval_count(100, 100)
    with pytest.raises(ValueError, match="neither a count nor a fraction"):
        eval_count(100, 1.5)


def test_split_is_a_seeded_partition(rng):
    n, seed = int(rng.integers(50, 500)), int(rng.integers(1 << 31))
    train, held_out = split_indices(n, 0.2, seed)
    assert len(held_out) == eval_count(n, 0.2)
    assert np.array_equal(np.sort(np.concatenate([train, held_out])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held_out) > 0)
    again = split_indices(n, 0.2, seed)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held_out)
    other = split_indices(n, 0.2, seed + 1)
    assert not np.array_equal(other[1], held_out)


def test_split_caps_take_nested_random_subsets(rng):
    n, seed = 400, int(rng.integers(1 << 31))
    train, held_out = split_indices(n, 40, seed)
    small_train, small_eval = split_indices(n, 40, seed, max_train_samples=30, max_eval_samples=7)
    smaller_train, _ = split_indices(n, 40, seed, max_train_samples=10)
    assert len(small_train) == 30 and len(small_eval) == 7
    assert set(smaller_train) <= set(small_train) <= set(train) and set(small_eval) <= set(held_out)
    assert np.array_equal(split_indices(n, 40, seed, max_train_samples=10)[1], held_out)
    # A random subset, not the start of the file.
    assert small_train.max() > 100
    examples = [f"example {i}" for i in range(n)]
    train_examples, eval_examples, cleaning = train_eval_split(examples, 40, seed, max_eval_samples=7)
    assert eval_examples == [examples[i] for i in small_eval]
    assert train_examples == [examples[i] for i in train]
    assert (cleaning.total, cleaning.kept, cleaning.duplicates) == (n, n, 0)


# ---------------------------------------------------------------------------------------- cleaning

def exchange(i: int, answer: str | None = None):
    """A one-exchange conversation from row ``i`` of rows.jsonl (answer ``answer {i}`` unless given)."""
    return make_example([("user", f"question {i}"), ("assistant", f"answer {i}" if answer is None else answer)],
                        f"rows.jsonl:{i}")


@pytest.mark.faults
def test_duplicates_and_empty_responses_are_dropped_and_counted(caplog):
    rows = [exchange(0), exchange(1), exchange(0), exchange(2, ""), exchange(3, " \n "),
            make_example([("user", "a"), ("assistant", ""), ("user", "b"), ("assistant", "c")], "x"),
            exchange(1), exchange(4)]
    with caplog.at_level(logging.WARNING, logger="qlora_jax.data.split"):
        kept, report = clean_examples(rows)
    assert [e.origin for e in kept] == ["rows.jsonl:0", "rows.jsonl:1", "x", "rows.jsonl:4"]  # first copies, in order
    assert (report.total, report.kept, report.duplicates, report.empty_responses, report.partly_empty) == (8, 4, 2, 2,
                                                                                                          1)
    assert "dropped 2 exact duplicates and 2 with only empty responses" in caplog.text


@pytest.mark.faults
def test_no_duplicate_straddles_the_split(rng):
    distinct = [exchange(i) for i in range(60)]
    rows = [distinct[int(i)] for i in rng.integers(0, 60, size=400)]  # heavy repetition, as in chatterbot-corpus
    seed = int(rng.integers(1 << 30))
    train, held_out, cleaning = train_eval_split(rows, 10, seed)
    key = lambda e: tuple((m["role"], m["content"]) for m in e.messages)  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in held_out}
    assert len(held_out) == 10 and len(train) + len(held_out) == cleaning.kept == len({key(e) for e in rows})
    assert cleaning.duplicates == 400 - cleaning.kept
    again = train_eval_split(rows, 10, seed)  # deterministic
    assert [e.origin for e in again.eval] == [e.origin for e in held_out]


@pytest.mark.faults
def test_embedded_chatterbot_corpus_is_mostly_duplicates():
    _, _, cleaning = train_eval_split(load_examples("chatterbot"), 96, 0)
    # Measured on the corpus as packaged: tech_support.yml repeats ten exchanges about a hundred times each.
    assert cleaning.total == 2025 and cleaning.kept == 898 and cleaning.empty_responses == 0
