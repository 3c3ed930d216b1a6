"""The embedded corpora: chatterbot-corpus (YAML) and chitchat-dataset (JSON), as :class:`Example` lists."""

from __future__ import annotations

import json
import logging
import pathlib

import yaml

from qlora_jax import assets
from qlora_jax.data.example import DatasetError, Example, make_example

__all__ = ["load_chatterbot", "load_chitchat"]

log = logging.getLogger(__name__)


def _alternating(texts: list[str], origin: str) -> Example:
    """user/assistant/user/... from at least two texts, a trailing user turn dropped."""
    turns = [("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(texts)]
    return make_example(turns[: len(turns) // 2 * 2], origin)


def load_chatterbot(language: str = "english") -> list[Example]:
    """chatterbot-corpus conversations of one language, files in name order.

    Each conversation's statements alternate user/assistant starting with the user; a trailing
    user statement is dropped. The corpus holds entries that YAML does not parse as a list of
    strings (English has one: ``trivia.yml`` entry 13, where a missing ``-`` fused the question
    and answer into one string); they are skipped (logged at INFO level).

    Args:
      language: a language folder of the installed corpus.

    Returns:
      The conversations as :class:`~qlora_jax.data.example.Example`.

    Raises:
      DatasetError: a corpus file that is not a mapping with a ``conversations`` list.
    """
    directory = assets.chatterbot_corpus_dir(language)
    examples = []
    for path in sorted(directory.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not isinstance(document.get("conversations"), list):
            raise DatasetError(f"{path}: expected a mapping with a 'conversations' list")
        for index, conversation in enumerate(document["conversations"]):
            origin = f"{path}: conversations[{index}]"
            if not (isinstance(conversation, list) and len(conversation) >= 2
                    and all(isinstance(text, str) for text in conversation)):
                log.info("%s: skipped, not a list of at least two strings: %.80r", origin, conversation)
                continue
            examples.append(_alternating(conversation, origin))
    return examples


def _chitchat_turns(turns: list, origin: str) -> list[str]:
    """One text per speaker turn: messages joined with a space, empty turns merged away."""
    speakers: list[str] = []
    texts: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, list) or not all(isinstance(m, dict) and isinstance(m.get("text"), str)
                                                 and "sender" in m for m in turn):
            raise DatasetError(f"{origin}: messages[{i}] must be a list of {{'text', 'sender', ...}} objects")
        text = " ".join(m["text"].strip() for m in turn if m["text"].strip())
        if not text:
            continue
        sender = turn[0]["sender"]
        # Dropping an empty turn leaves the other speaker twice in a row: their turns become one.
        if speakers and speakers[-1] == sender:
            texts[-1] = f"{texts[-1]} {text}"
        else:
            speakers.append(sender)
            texts.append(text)
    return texts


def load_chitchat(path: str | pathlib.Path | None = None) -> list[Example]:
    """chitchat-dataset conversations with at least two speaker turns, in file order.

    The speaker who opens a conversation is the user, the other the assistant. A turn's messages
    are joined with a space. Turns with no text (12 in the corpus) are dropped and the
    neighbouring turns of the other speaker merged; a trailing user turn is dropped. Conversations
    left with fewer than two turns are skipped.

    Args:
      path: the dataset's JSON file (None: the installed package's).

    Returns:
      The conversations as :class:`~qlora_jax.data.example.Example`.

    Raises:
      DatasetError: a file or conversation of another shape, naming it.
    """
    path = pathlib.Path(path) if path is not None else assets.chitchat_dataset_file()
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object of conversations keyed by id")
    examples = []
    for key, conversation in data.items():
        origin = f"{path}: {key}"
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise DatasetError(f"{origin}: expected an object with a 'messages' list")
        texts = _chitchat_turns(conversation["messages"], origin)
        if len(texts) >= 2:
            examples.append(_alternating(texts, origin))
    return examples
