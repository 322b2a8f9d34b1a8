"""The R²ec user and item prompts (DESIGN §5 step 1, §6), as plain text and chat-rendered.

- User prompt: the category, the newest `history_window` history items (titles and ratings,
  oldest first so the newest is last), and the instruction to reason and then give the answer
  between the answer markers.
- Item prompt: title, average rating, number of buyers (the `rating_number` field) and the
  description truncated to `description_words` words.

Both are a single user turn; `render_chat` wraps one in the tokenizer's chat template, with
the generation prompt (the assistant turn's opening) appended, as the reference does before
it reads the last hidden state or starts sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

from r2ec_fast.data.dataset import ItemCatalog, Split


@dataclass
class PromptConfig:
    answer_start: str = "<answer>"
    answer_end: str = "</answer>"
    history_window: int = 20
    description_words: int = 100

    def __post_init__(self):
        if not (self.answer_start and self.answer_end) or self.answer_start == self.answer_end:
            raise ValueError("answer_start and answer_end must be two different non-empty "
                             f"markers, got {self.answer_start!r} and {self.answer_end!r}")
        if self.history_window < 1:
            raise ValueError(f"history_window must be >= 1, got {self.history_window}")
        if self.description_words < 0:
            raise ValueError(f"description_words must be >= 0, got {self.description_words}")


def _category_phrase(category: str) -> str:
    return f"{category} products" if category else "products"


def truncate_words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words[:limit]) + (" ..." if len(words) > limit else "")


def item_prompt(items: ItemCatalog, item_id: int, category: str = "",
                config: PromptConfig | None = None) -> str:
    """The text whose last hidden state becomes item `item_id`'s row of the rec head."""
    config = config or PromptConfig()
    if not 1 <= item_id <= items.num_items:
        raise ValueError(f"item id {item_id} is not in 1..{items.num_items}")
    lines = [f"Describe this item from the {_category_phrase(category)} catalog.",
             f"Title: {items.title[item_id]}",
             f"Average rating: {float(items.average_rating[item_id]):.1f}",
             f"Number of buyers: {int(items.rating_number[item_id])}"]
    if items.categories[item_id]:
        lines.append(f"Category: {items.categories[item_id]}")
    desc = truncate_words(items.description[item_id], config.description_words)
    if desc:
        lines.append(f"Description: {desc}")
    return "\n".join(lines)


def user_prompt(split: Split, row: int, items: ItemCatalog, category: str = "",
                config: PromptConfig | None = None) -> str:
    """The text the policy reasons from: the user's newest history, newest last."""
    config = config or PromptConfig()
    if not 0 <= row < len(split):
        raise ValueError(f"row {row} is not in 0..{len(split) - 1}")
    ids = split.history(row)[-config.history_window:]
    ratings = split.history_ratings(row)[-config.history_window:]
    history = "\n".join(f"{k + 1}. {items.title[i]} (rating: {float(r):.1f})"
                        for k, (i, r) in enumerate(zip(ids.tolist(), ratings.tolist())))
    return (f"A user bought and rated these {_category_phrase(category)}, oldest first and "
            f"newest last:\n{history}\n"
            "Think step by step about what the user likes and what they are likely to buy "
            f"next, then describe that item between {config.answer_start} and "
            f"{config.answer_end}.")


def render_chat(tokenizer, text: str, add_generation_prompt: bool = True) -> str:
    """`text` as one user turn in the tokenizer's chat template (untokenised)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; give it "
                         "one (make-tiny-model writes one) or use a chat model's tokenizer")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
