"""Multiple-choice inputs: file readers, bad rows, MMLU's k-shot prompts, the chatterbot task, metrics."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from qlora_jax import data as data_lib
from qlora_jax.data.example import DatasetError
from qlora_jax.eval import (
    MultipleChoiceScores,
    Question,
    build_items,
    chatterbot_task,
    conversation_topic,
    load_qlora_items,
    load_questions,
    load_task,
    plot_accuracy,
    read_table,
)

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta", "theta", "lambda")


def random_questions(rng, n, subjects=("abstract_algebra", "anatomy"), num_choices=4):
    return [{"question": " ".join(rng.choice(WORDS, 4)) + "?", "subject": str(subjects[i % len(subjects)]),
             "choices": [" ".join(rng.choice(WORDS, 2)) for _ in range(num_choices)],
             "answer": int(rng.integers(num_choices))} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------- readers

def test_questions_jsonl_and_json_read_as_written(tmp_path, rng):
    rows = random_questions(rng, 5)
    rows[2]["context"] = "Some passage.\n\n"
    for path in (write_jsonl(tmp_path / "q.jsonl", rows), tmp_path / "q.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(rows))
        questions = load_questions(path)
        assert [(q.question, list(q.choices), q.answer, q.subject) for q in questions] == \
            [(r["question"], r["choices"], r["answer"], r["subject"]) for r in rows]
        assert [q.context for q in questions] == ["", "", "Some passage.\n\n", "", ""]
        assert questions[3].origin == (f"{path}:4" if path.suffix == ".jsonl" else f"{path}[3]")


def test_qlora_mmlu_json_rows_become_letter_items(tmp_path, rng):
    # qlora.py's data/mmlu/*.json: one object per line under a .json name.
    rows = [{"subject": "anatomy", "input": f"The following are ... about  anatomy.\n\nQ{i}?\nA. a\nB. b\nC. c\n"
             f"D. d\nAnswer:", "output": "ABCD"[int(rng.integers(4))]} for i in range(4)]
    path = tmp_path / "five_shot_mmlu_val.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_qlora_items(path)
    assert [it.context for it in items] == [r["input"] for r in rows]
    assert [it.answer for it in items] == ["ABCD".index(r["output"]) for r in rows]
    assert all(it.choices == ("A", "B", "C", "D") and it.delimiter == "" and it.separate_encoding for it in items)
    task = load_task(path)
    assert task.name == "five_shot_mmlu_val" and len(task) == 4
    with pytest.raises(ValueError, match="already rendered"):
        load_task(path, shots=5)


def test_parquet_needs_pyarrow_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "test-00000-of-00001.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetError, match=r"test-00000-of-00001\.parquet: reading \.parquet files needs pyarrow"):
        read_table(path)


def test_parquet_hf_mmlu_columns(tmp_path, rng):
    import pyarrow as pa  # pinned in requirements/ci.txt (the data extra): never skipped
    import pyarrow.parquet as pq

    rows = random_questions(rng, 3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    questions = load_questions(tmp_path / "test.parquet")
    assert [(q.question, list(q.choices), q.answer) for q in questions] == \
        [(r["question"], r["choices"], r["answer"]) for r in rows]


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("choices"), r"q\.jsonl:2: missing field 'choices'"),
    (lambda r: r.update(answer=4), r"q\.jsonl:2: field 'answer' is 4, out of range for 4 choices"),
    (lambda r: r.update(answer=-1), r"q\.jsonl:2: field 'answer' is -1, out of range"),
    (lambda r: r.update(answer=True), r"q\.jsonl:2: field 'answer' must be an integer index"),
    (lambda r: r.update(answer="B"), r"q\.jsonl:2: field 'answer' must be an integer index"),
    (lambda r: r.update(choices="A or B"), r"q\.jsonl:2: field 'choices' must be a list of strings"),
    (lambda r: r.update(choices=["only one"]), r"q\.jsonl:2: field 'choices' needs at least 2"),
    (lambda r: r["choices"].__setitem__(1, 7), r"q\.jsonl:2: field 'choices\[1\]' must be a string"),
    (lambda r: r["choices"].__setitem__(2, "  "), r"q\.jsonl:2: field 'choices\[2\]' is empty"),
    (lambda r: r.update(question=""), r"q\.jsonl:2: field 'question' is empty"),
])
def test_bad_question_row_names_file_row_and_field(tmp_path, rng, change, message):
    rows = random_questions(rng, 3)
    change(rows[1])
    with pytest.raises(DatasetError, match=message):
        load_questions(write_jsonl(tmp_path / "q.jsonl", rows))


@pytest.mark.parametrize("content, message", [
    ("", r"empty\.jsonl: the file holds no rows"),
    ("\n\n", r"empty\.jsonl: the file holds no rows"),
    ('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n{"input": "x", "output": "A"}\n',
     r"empty\.jsonl:2: not a 'questions'-format row"),
    ('{"prompt": "q?"}\n', r"empty\.jsonl:1: cannot tell the format"),
    ('[1, 2]\n', r"empty\.jsonl:1: expected an object"),
])
def test_empty_or_mixed_files_are_refused(tmp_path, content, message):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_task(path)


def test_bad_qlora_output_letter(tmp_path):
    path = write_jsonl(tmp_path / "mmlu.jsonl", [{"input": "Q?\nAnswer:", "output": "A"},
                                                 {"input": "Q?\nAnswer:", "output": "E"}])
    with pytest.raises(DatasetError, match=r"mmlu\.jsonl:2: field 'output' must be one of the letters A, B, C, D"):
        load_qlora_items(path)


def test_unknown_task_and_file_type(tmp_path):
    with pytest.raises(DatasetError, match="unknown multiple-choice task 'mmlu'"):
        load_task("mmlu")
    (tmp_path / "q.csv").write_text("question,answer\n")
    with pytest.raises(DatasetError, match=r"q\.csv: unsupported file type '\.csv'"):
        load_task(tmp_path / "q.csv")


# ---------------------------------------------------------------------------------------- prompts

def _q(question, choices, answer, subject="college_biology", origin="t"):
    return Question(question, tuple(choices), answer, subject, origin=origin)


def test_k_shot_letter_prompt_exactly():
    dev = [_q("What is a cell? ", ["A unit", "A wall", "A gene", "A tissue"], 0),
           _q("Which is an organelle?", ["Skin", "Mitochondrion", "Bone", "Blood"], 1),
           _q("Unused third shot?", ["w", "x", "y", "z"], 2),
           _q("Other subject", ["w", "x", "y", "z"], 3, subject="anatomy")]
    question = _q("  Where is DNA kept?", ["Nucleus", "Membrane", "Ribosome", "Vacuole"], 0)
    (item,) = build_items([question], shots=2, dev=dev)
    assert item.context == (
        "The following are multiple choice questions (with answers) about college biology.\n\n"
        "What is a cell?\nA. A unit\nB. A wall\nC. A gene\nD. A tissue\nAnswer: A\n\n"
        "Which is an organelle?\nA. Skin\nB. Mitochondrion\nC. Bone\nD. Blood\nAnswer: B\n\n"
        "Where is DNA kept?\nA. Nucleus\nB. Membrane\nC. Ribosome\nD. Vacuole\nAnswer:")
    assert item.choices == ("A", "B", "C", "D") and item.delimiter == " " and item.answer == 0
    (zero,) = build_items([question], shots=0)
    assert zero.context == ("The following are multiple choice questions (with answers) about college biology.\n\n"
                            "Where is DNA kept?\nA. Nucleus\nB. Membrane\nC. Ribosome\nD. Vacuole\nAnswer:")


def test_cloze_prompt_and_subjectless_header_exactly():
    dev = [_q("2 + 2?", ["four", "five"], 0, subject="")]
    question = _q("3 + 3?", ["six", "seven", "eight"], 0, subject="")
    (cloze,) = build_items([question], shots=1, style="cloze", dev=dev)
    assert cloze.context == "Question: 2 + 2?\nAnswer: four\n\nQuestion: 3 + 3?\nAnswer:"
    assert cloze.choices == ("six", "seven", "eight") and cloze.delimiter == " "
    (letter,) = build_items([question], shots=0)
    assert letter.context == ("The following are multiple choice questions (with answers).\n\n"
                              "3 + 3?\nA. six\nB. seven\nC. eight\nAnswer:")
    assert letter.choices == ("A", "B", "C")


def test_shots_without_dev_split_come_from_other_questions_of_the_subject():
    questions = [_q(f"Q{i}?", ["a", "b", "c", "d"], i % 4, subject="s" if i < 3 else "t") for i in range(5)]
    items = build_items(questions[:3], shots=2)
    assert items[0].context.count("Answer:") == 3 and "Q1?" in items[0].context and "Q2?" in items[0].context
    assert "Q0?" in items[1].context and "Q2?" in items[1].context and items[1].context.count("Q1?") == 1
    with pytest.raises(DatasetError, match=r"2-shot prompts need 2 other questions of subject 't' in the evaluated"):
        build_items(questions[3:], shots=2)


def test_shots_and_a_row_context_together_are_refused():
    question = Question("Q?", ("a", "b"), 0, "s", context="Examples...\n\n", origin="f.jsonl:7")
    with pytest.raises(DatasetError, match=r"f\.jsonl:7: the row has its own few-shot context"):
        build_items([question], shots=1, dev=[_q("D?", ["a", "b"], 1, subject="s")])
    (item,) = build_items([question], shots=0)
    assert item.context == mmlu_context_prefix("s") + "Examples...\n\nQ?\nA. a\nB. b\nAnswer:"


def mmlu_context_prefix(subject):
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def test_load_task_question_file_with_dev_file(tmp_path, rng):
    test_rows, dev_rows = random_questions(rng, 4), random_questions(rng, 10)
    task = load_task(write_jsonl(tmp_path / "test.jsonl", test_rows), shots=3,
                     dev_file=write_jsonl(tmp_path / "dev.jsonl", dev_rows))
    for item, row in zip(task.items, test_rows, strict=True):
        shots = [r for r in dev_rows if r["subject"] == row["subject"]][:3]
        expected = mmlu_context_prefix(row["subject"].replace("_", " ")) + "".join(
            f"{s['question']}\n" + "".join(f"{'ABCD'[j]}. {c}\n" for j, c in enumerate(s["choices"])) +
            f"Answer: {'ABCD'[s['answer']]}\n\n" for s in shots) + row["question"] + "\n" + \
            "".join(f"{'ABCD'[j]}. {c}\n" for j, c in enumerate(row["choices"])) + "Answer:"
        assert item.context == expected
    with pytest.raises(ValueError, match="unknown prompt style 'mmlu'"):
        load_task(tmp_path / "test.jsonl", style="mmlu")


# ---------------------------------------------------------------------------------------- chatterbot

@pytest.fixture(scope="module")
def chatterbot_split():
    examples = data_lib.load_examples("chatterbot")
    return data_lib.train_eval_split(examples, 96, 0)


def test_chatterbot_task_is_deterministic_and_never_trained_on(chatterbot_split):
    train, held_out = chatterbot_split.train, chatterbot_split.eval
    task = chatterbot_task(eval_dataset_size=96, seed=0)
    again = load_task("chatterbot", eval_dataset_size=96, seed=0)
    assert task.items == again.items and len(task) >= 10

    def normal(text):
        return " ".join(text.casefold().split())

    trained = {normal(m["content"]) for ex in train for m in ex.messages}
    held_by_origin = {ex.origin: ex for ex in held_out}
    train_origins = {ex.origin for ex in train}
    answers = []
    for item in task.items:
        assert item.origin in held_by_origin and item.origin not in train_origins
        conversation = held_by_origin[item.origin]
        assert item.context == conversation.messages[0]["content"]
        assert item.choices[item.answer] == conversation.messages[1]["content"]
        assert item.subject == conversation_topic(conversation) and item.chat
        assert len({normal(c) for c in item.choices}) == 4
        assert not ({normal(item.context)} | {normal(c) for c in item.choices}) & trained
        # Distractors are replies from other topics of the held-out split.
        topics = {normal(ex.messages[1]["content"]): conversation_topic(ex) for ex in held_out}
        assert all(topics[normal(c)] != item.subject for j, c in enumerate(item.choices) if j != item.answer)
        answers.append(item.answer)
    assert len(set(answers)) > 1  # the true reply is not always in the same place
    other_seed = chatterbot_task(eval_dataset_size=96, seed=1)
    assert [it.origin for it in other_seed.items] != [it.origin for it in task.items]
    with pytest.raises(ValueError, match="zero-shot chat"):
        load_task("chatterbot", shots=5)


# ---------------------------------------------------------------------------------------- metrics

def test_metrics_against_hand_computation(rng):
    n, c = 40, 4
    loglik = rng.normal(size=(n, c)) * 3
    chars = rng.integers(1, 30, size=(n, c))
    tokens = rng.integers(1, 6, size=(n, c))
    answers = rng.integers(0, c, size=n)
    subjects = [("x", "y", "z")[i % 3] for i in range(n)]
    choices = [["w" * int(k) for k in row] for row in chars]
    scores = MultipleChoiceScores.from_rows(loglik.tolist(), tokens.tolist(), choices, answers.tolist(), subjects)
    m = scores.metrics(prefix="t_")
    correct = [float(np.argmax(loglik[i]) == answers[i]) for i in range(n)]
    correct_norm = [float(np.argmax(loglik[i] / chars[i]) == answers[i]) for i in range(n)]
    p = sum(correct) / n
    assert m["t_acc"] == pytest.approx(p)
    assert m["t_acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert m["t_acc_norm"] == pytest.approx(sum(correct_norm) / n)
    assert m["t_answer_loss"] == pytest.approx(np.mean([-loglik[i, answers[i]] / tokens[i, answers[i]]
                                                        for i in range(n)]))
    per = {s: [correct[i] for i in range(n) if subjects[i] == s] for s in "xyz"}
    assert [m[f"t_acc/{s}"] for s in "xyz"] == pytest.approx([np.mean(v) for v in per.values()])
    assert m["t_subject_mean_acc"] == pytest.approx(np.mean([np.mean(v) for v in per.values()]))
    errors = [math.sqrt(np.mean(v) * (1 - np.mean(v)) / (len(v) - 1)) for v in per.values()]
    assert m["t_subject_mean_acc_stderr"] == pytest.approx(math.sqrt(sum(e * e for e in errors)) / 3)
    assert m["t_count"] == n and m["t_count/x"] == 14
    json.dumps(m, allow_nan=False)  # fit for metrics.jsonl


def test_plot_accuracy_draws_the_eval_entries(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [{"kind": "train", "step": 1, "loss": 2.0},
               {"kind": "mc_eval", "step": 10, "mc_acc": 0.5, "mc_acc_stderr": 0.1, "mc_acc_norm": 0.4},
               {"kind": "mc_eval", "step": 0, "mc_acc": 0.25, "mc_acc_stderr": None, "mc_acc_norm": 0.3}]
    fig, ax = plt.subplots()
    twin = plot_accuracy(ax, history)
    lines = [container.lines[0] for container in twin.containers]  # each errorbar's data line
    assert [list(line.get_xdata()) for line in lines] == [[0, 10], [0, 10]]
    assert [list(line.get_ydata()) for line in lines] == [[0.25, 0.5], [0.3, 0.4]]
    assert plot_accuracy(ax, history[:1]) is None
    plt.close(fig)
