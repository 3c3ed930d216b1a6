"""Rendering conversations with chat templates and masking everything but the assistant's tokens."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_jax.data import (
    ChatRenderer,
    ChatTemplateError,
    Example,
    load_chatterbot,
    make_example,
    tokenize_example,
    tokenize_examples,
)
from qlora_jax.model import load_tokenizer
from qlora_jax.tokenizer import Tokenizer

# SmolLM2's own template inserts this system turn when a conversation has none.
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("embedded")


def expected_tokens(tok, pieces):
    """Ids and mask from ``[(text, is_target)]`` pieces, each encoded on its own; ``<|im_end|>`` by id."""
    ids, mask = [], []
    for text, is_target in pieces:
        piece = []
        for i, part in enumerate(text.split("<|im_end|>")):
            if i:
                piece.append(tok.token_id("<|im_end|>"))
            piece += tok.encode(part, add_bos=False) if part else []
        ids += piece
        mask += [int(is_target)] * len(piece)
    return ids, mask


def check(tokenized, ids, mask):
    assert tokenized.input_ids.dtype == np.int32 and tokenized.loss_mask.dtype == np.int32
    assert tokenized.input_ids.tolist() == ids
    assert tokenized.loss_mask.tolist() == [0] + mask[1:]


def test_single_turn_masks_exactly_the_response(tok):
    example = make_example([("user", "What is 2+2?"), ("assistant", "2+2 is 4.")], "hand-built")
    source = DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids, mask = expected_tokens(tok, [(source, False), ("2+2 is 4.<|im_end|>", True), ("\n", False)])
    tokenized = tokenize_example(example, tok)
    check(tokenized, ids, mask)
    targets = tokenized.input_ids[tokenized.loss_mask == 1]
    assert tok.decode(targets, skip_special_tokens=False) == "2+2 is 4.<|im_end|>"
    assert targets[-1] == tok.eos_id == tok.token_id("<|im_end|>")  # the model learns to stop
    # The prompt tokens are those the model sees at inference, and the whole equals the whole text encoded.
    prompt = tok.encode(tok.apply_chat_template(example.messages[:1], add_generation_prompt=True))
    assert tokenized.input_ids[: len(prompt)].tolist() == prompt
    assert tokenized.input_ids.tolist() == tok.encode(tok.apply_chat_template(example.messages))


def test_multi_turn_every_assistant_turn_is_a_target(tok):
    example = make_example([
        ("system", "Answer in one word."), ("user", "Capital of France?"), ("assistant", "Paris."),
        ("user", "And of Italy?"), ("assistant", "Rome."),
    ], "hand-built")
    ids, mask = expected_tokens(tok, [
        ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Rome.<|im_end|>", True),
        ("\n", False),
    ])
    tokenized = tokenize_example(example, tok)
    check(tokenized, ids, mask)
    runs = np.split(tokenized.input_ids, np.flatnonzero(np.diff(tokenized.loss_mask)) + 1)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs[1::2]] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]


def test_train_on_source_makes_every_token_a_target(tok):
    example = make_example([("user", "Hi"), ("assistant", "Hello!")], "hand-built")
    masked, unmasked = (tokenize_example(example, tok, train_on_source=flag) for flag in (False, True))
    assert np.array_equal(masked.input_ids, unmasked.input_ids)
    assert unmasked.loss_mask.tolist() == [0] + [1] * (len(unmasked) - 1)
    assert 0 < masked.loss_mask.sum() < unmasked.loss_mask.sum()


def test_truncation_keeps_the_end_of_the_source_and_the_start_of_the_response(tok):
    question = " ".join(f"word{i}" for i in range(200)) + " - which word comes last?"
    answer = " ".join(f"reply{i}" for i in range(100))
    example = make_example([("user", question), ("assistant", answer)], "hand-built")
    source = DEFAULT_SYSTEM + f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    source_ids, _ = expected_tokens(tok, [(source, False)])
    response_ids, response_mask = expected_tokens(tok, [(answer + "<|im_end|>", True), ("\n", False)])
    for source_max_len, target_max_len in [(20, 7), (1, 1), (len(source_ids), len(response_ids) - 1)]:
        tokenized = tokenize_example(example, tok, source_max_len=source_max_len, target_max_len=target_max_len)
        ids = source_ids[-source_max_len:] + response_ids[:target_max_len]
        mask = [0] * source_max_len + response_mask[:target_max_len]
        check(tokenized, ids, mask)
    # " comes", " last", "?", "<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n" | "reply", "0", " reply", "1"
    assert tok.decode(tokenize_example(example, tok, source_max_len=9, target_max_len=4).input_ids,
                      skip_special_tokens=False) == " comes last?<|im_end|>\n<|im_start|>assistant\nreply0 reply1"
    # Nothing to cut: the budgets are maxima, not lengths.
    whole = tokenize_example(example, tok, source_max_len=4096, target_max_len=4096)
    assert whole.input_ids.tolist() == source_ids + response_ids


def test_truncating_a_conversation_keeps_earlier_answers_as_targets(tok):
    turns = [("user", "First question, fairly long to take some tokens?"), ("assistant", "First answer."),
             ("user", "Second question?"), ("assistant", "Second answer, which is the response.")]
    example = make_example(turns, "hand-built")
    pieces = [(DEFAULT_SYSTEM + f"<|im_start|>user\n{turns[0][1]}<|im_end|>\n<|im_start|>assistant\n", False),
              ("First answer.<|im_end|>", True),
              (f"\n<|im_start|>user\n{turns[2][1]}<|im_end|>\n<|im_start|>assistant\n", False)]
    source_ids, source_mask = expected_tokens(tok, pieces)
    response_ids, response_mask = expected_tokens(tok, [(turns[3][1] + "<|im_end|>", True), ("\n", False)])
    tokenized = tokenize_example(example, tok, source_max_len=16, target_max_len=5)
    check(tokenized, source_ids[-16:] + response_ids[:5], source_mask[-16:] + response_mask[:5])
    assert 0 < sum(source_mask[-16:]) < 16  # the cut kept the end of the first answer, as targets


def test_bos_survives_source_truncation_when_the_tokenizer_adds_it(tok):
    template = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    example = make_example([("user", "one two three four five six seven eight nine ten"), ("assistant", "ok")], "x")
    source_ids, _ = expected_tokens(tok, [("<|endoftext|><|im_start|>user\none two three four five six seven eight "
                                           "nine ten<|im_end|>\n<|im_start|>assistant\n", False)])
    assert source_ids[0] == 0
    for add_bos in (True, False):
        llama_like = Tokenizer(tok.hf, bos_token="<|endoftext|>", eos_token="<|im_end|>", add_bos_token=add_bos,
                               chat_template=template)
        tokenized = tokenize_example(example, llama_like, source_max_len=6)
        kept = [0] + source_ids[-5:] if add_bos else source_ids[-6:]
        assert tokenized.input_ids[:6].tolist() == kept


def test_templates_that_cannot_be_split_are_rejected(tok):
    example = make_example([("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")], "data.jsonl:7")
    last_turn_marked = ("{% for m in messages %}{% if loop.last %}FINAL {% endif %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ChatTemplateError, match=r"^data\.jsonl:7: the chat template is not prefix-stable: "
                                                r"rendering messages\[:1\] with the generation prompt"):
        tokenize_example(example, tok, template=last_turn_marked)
    no_end_token = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatTemplateError, match="without a special end-of-turn token"):
        tokenize_example(example, tok, template=no_end_token)
    two_users = make_example([("user", "a"), ("user", "b"), ("assistant", "c")], "data.jsonl:9")
    with pytest.raises(ChatTemplateError, match=r"^data\.jsonl:9: the chat template refuses this conversation: "
                                                r".*must alternate"):
        tokenize_example(two_users, tok, template="llama2")


@pytest.mark.parametrize("template", [None, "chatml", "llama2", "llama3"])
def test_renderer_matches_apply_chat_template(tok, template):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    render = ChatRenderer.for_tokenizer(tok, template)
    for k in range(1, len(messages) + 1):
        for generation in (False, True):
            assert render(messages[:k], add_generation_prompt=generation) == tok.apply_chat_template(
                messages[:k], add_generation_prompt=generation, template=template)


def test_llama2_template_targets_end_with_its_eos(tok):
    example = make_example([("user", "Capital of France?"), ("assistant", "Paris."), ("user", "Italy?"),
                            ("assistant", "Rome.")], "hand-built")
    tokenized = tokenize_example(example, tok, template="llama2")
    runs = np.split(tokenized.input_ids, np.flatnonzero(np.diff(tokenized.loss_mask)) + 1)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs[1::2]] == [" Paris. <|im_end|>",
                                                                              " Rome. <|im_end|>"]


def test_chatterbot_targets_are_exactly_the_answers(tok):
    examples = load_chatterbot()
    tokenized = tokenize_examples(examples, tok, source_max_len=512, target_max_len=512)
    for i, (example, t) in enumerate(zip(examples, tokenized, strict=True)):
        assert t.loss_mask[0] == 0 and len(t) <= 1024
        answers = "".join(m["content"] + "<|im_end|>" for m in example.messages if m["role"] == "assistant")
        assert tok.decode(t.input_ids[t.loss_mask == 1], skip_special_tokens=False) == answers
        if i % 20 == 0:  # apply_chat_template compiles its template per call: a sample suffices
            assert tok.decode(t.input_ids, skip_special_tokens=False) == tok.apply_chat_template(example.messages)


def test_worker_processes_give_the_same_tokens(tok, rng):
    words = ["alpha", "beta", "gamma", "delta", "hello", "world", "yes", "no"]
    examples = [
        make_example([("user" if j % 2 == 0 else "assistant", " ".join(rng.choice(words, size=int(rng.integers(1, 6)))))
                      for j in range(64)], f"synthetic {i}")
        for i in range(60)
    ]
    serial = tokenize_examples(examples, tok, target_max_len=64)
    parallel = tokenize_examples(examples, tok, target_max_len=64, num_workers=2)
    for a, b in zip(serial, parallel, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)


def test_invalid_examples_and_options_are_rejected(tok):
    with pytest.raises(ValueError, match="no assistant message"):
        Example(({"role": "user", "content": "hi"},), "x")
    with pytest.raises(ValueError, match="role 'bot'"):
        make_example([("user", "hi"), ("bot", "hello")], "x")
    with pytest.raises(ValueError, match="source_max_len and target_max_len must be at least 1"):
        tokenize_example(make_example([("user", "hi"), ("assistant", "hello")], "x"), tok, target_max_len=0)
