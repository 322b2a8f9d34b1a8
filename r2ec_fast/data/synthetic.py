"""A synthetic catalog and users whose next item follows a rule readable from the history text.

Real data cannot tell whether a small model on CPU learns anything; this can. The generative
process (every draw from one ``numpy.random.Generator(seed)``: same arguments, same data):

Catalog. ``G = num_genres`` genres (GENRES, e.g. "Camping") and ``A = num_attributes``
attributes (ATTRIBUTES, colours, e.g. "Teal") make G x A cells; item ids 1..n are dealt to
cells by a random permutation of ``[0, 1, ..., n-1] mod (G*A)``, so every cell holds
floor(n/GA) or ceil(n/GA) items (cell = genre * A + attribute). Each item has a unique
made-up name (syllables) and this text:
  title        "<Attribute> <genre noun>: <Name>"                 e.g. "Teal Tent: Ravenel"
  description  ["A <attribute> <genre noun> for <genre> lovers.",
                "<Name> comes in <attribute> and is made for <genre>.", <F filler sentences>]
               F = 0 with probability 0.4, else uniform in 1..14: like a real catalog, where
               many items have little description and others reach the prompt's 100-word
               cut, the prompts' lengths vary (70-180 tokens with the tiny tokenizer), which
               is what batching by token budget is for
  categories   "<Genre>"
so the genre and the attribute are written out in the title, the description and categories.

Users. User u gets 1 + L interactions, L uniform in ``history_len`` (inclusive), a taste genre
g_u (genre g with weight proportional to 1/sqrt(g + 1), so some genres are more popular) and a
starting attribute a_u (uniform). Interaction 0 is uniform in the cell (g_u, a_u). Interaction
t >= 1 sees the window of the previous ``history_window`` interactions (exactly the history of
the sample it becomes) and, with probability ``noise``, is a noise item: uniform over the
items not in the window. Otherwise it follows THE RULE:
  genre     = the genre most frequent in the window (ties: the one that appears first,
              i.e. oldest),
  attribute = the attribute of the newest item in the window,
  item      = uniform over the items of that (genre, attribute) cell not in the window
              (a noise item when the window holds all of them).
Noise items shift the newest attribute, so users drift between attributes while their genre
stays. Ratings: rule items (and interaction 0) 3/4/5 with probabilities .1/.3/.6, noise items
1/2/3/4 with .3/.4/.2/.1. Timestamps (ms): a start uniform over the two years from
2021-01-01, then gaps of one hour plus an exponential of mean five days, so they increase per
user. Item average_rating and rating_number are computed from all generated interactions.

Splits: `build_splits` (the prepare-data protocol): every interaction after the user's first
is a sample with the previous ``history_window`` interactions as history (newest last),
temporal 80/10/10 over samples. ``meta["rule_fraction"]`` is the share of samples whose
target followed the rule, about the ceiling of any predictor.

Baselines (`baselines`, test split, k=10), measured for ``--items 2000 --users 2000 --seed 0``
(cells of 10-11 items; 25,012 samples, 2,501 in test; rule_fraction 0.790):
  popularity (most frequent train targets not in the history)  Hit@10 0.0104  NDCG@10 0.0044
  the rule applied to the history text (no target)             Hit@10 0.7833  NDCG@10 0.4252
The rule's NDCG is lower than its Hit because the process picks uniformly inside the cell.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from r2ec_fast.data.splits import SPLIT_FRACTIONS, build_splits
from r2ec_fast.data.dataset import ItemCatalog, RecDataset

CATEGORY = "Synthetic Goods"
GENRES = (("Board Games", "board game"), ("Jigsaw Puzzles", "jigsaw puzzle"),
          ("Gardening", "planter"), ("Cooking", "skillet"), ("Camping", "tent"),
          ("Painting", "paint set"), ("Music", "ukulele"), ("Fitness", "yoga mat"),
          ("Travel", "backpack"), ("Photography", "camera bag"), ("Knitting", "yarn bundle"),
          ("Astronomy", "star chart"), ("Fishing", "tackle box"), ("Cycling", "bike bell"),
          ("Baking", "cake pan"), ("Pottery", "clay kit"))
ATTRIBUTES = ("Crimson", "Azure", "Golden", "Emerald", "Silver", "Ivory", "Amber", "Violet",
              "Charcoal", "Coral", "Teal", "Olive")
FILLERS = ("It ships in a recyclable box.", "Assembly takes a few minutes.",
           "A gift card is included.", "Hand wash only.", "It comes with a one-year warranty.",
           "It is made from sturdy materials.", "It suits beginners and experts alike.",
           "Batteries are not included.")
SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "is", "bel", "dra", "no", "su", "fi", "zan",
             "el", "qu", "or")
START_MS = 1_609_459_200_000  # 2021-01-01T00:00:00Z
SPAN_MS = 2 * 365 * 24 * 3600 * 1000  # user start times spread over two years
HOUR_MS, MEAN_GAP_MS = 3600 * 1000, 5 * 24 * 3600 * 1000
RULE_RATINGS, RULE_PROBS = (3.0, 4.0, 5.0), (0.1, 0.3, 0.6)
NOISE_RATINGS, NOISE_PROBS = (1.0, 2.0, 3.0, 4.0), (0.3, 0.4, 0.2, 0.1)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check(num_items, num_users, history_len, num_genres, num_attributes, noise,
           history_window) -> None:
    if not _is_int(num_genres) or not 1 <= num_genres <= len(GENRES):
        raise ValueError(f"num_genres must be an integer in 1..{len(GENRES)}, got {num_genres!r}")
    if not _is_int(num_attributes) or not 1 <= num_attributes <= len(ATTRIBUTES):
        raise ValueError(f"num_attributes must be an integer in 1..{len(ATTRIBUTES)}, got "
                         f"{num_attributes!r}")
    cells = num_genres * num_attributes
    if not _is_int(num_items) or num_items < cells:
        raise ValueError(f"num_items={num_items!r}: need an integer >= num_genres * "
                         f"num_attributes = {cells} (an item in every cell); raise it or lower "
                         "num_genres/num_attributes")
    if not _is_int(num_users) or num_users < 1:
        raise ValueError(f"num_users must be an integer >= 1, got {num_users!r}")
    if (len(tuple(history_len)) != 2 or not all(_is_int(x) for x in history_len)
            or not 1 <= history_len[0] <= history_len[1]):
        raise ValueError(f"history_len must be (min, max) integers with 1 <= min <= max, got "
                         f"{history_len!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1:
        raise ValueError(f"noise must be a probability in [0, 1), got {noise!r}")
    if not _is_int(history_window) or history_window < 1:
        raise ValueError(f"history_window must be an integer >= 1, got {history_window!r}")
    if num_items <= history_window:  # noise items are drawn from outside the window
        raise ValueError(f"num_items={num_items} must exceed history_window={history_window}")


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct made-up names: a permuted index written in base len(SYLLABLES)."""
    width = max(3, math.ceil(math.log(n, len(SYLLABLES))) if n > 1 else 3)
    names = []
    for index in rng.permutation(n).tolist():
        parts = []
        for _ in range(width):
            index, digit = divmod(index, len(SYLLABLES))
            parts.append(SYLLABLES[digit])
        names.append("".join(parts).capitalize())
    return names


def _catalog_text(rng, genre: np.ndarray, attribute: np.ndarray) -> tuple[list, list, list]:
    """Titles, descriptions and categories of items 1..n (row 0: padding)."""
    n = len(genre) - 1
    names = _names(rng, n)
    counts = np.where(rng.random(n + 1) < 0.4, 0, rng.integers(1, 15, n + 1))
    title, description, category = [""], [""], [""]
    for i in range(1, n + 1):
        (g_name, noun), attr = GENRES[genre[i]], ATTRIBUTES[attribute[i]]
        name = names[i - 1]
        title.append(f"{attr} {noun.title()}: {name}")
        fillers = [FILLERS[f] for f in rng.integers(0, len(FILLERS), counts[i]).tolist()]
        description.append("\n".join([f"A {attr.lower()} {noun} for {g_name.lower()} lovers.",
                                      f"{name} comes in {attr.lower()} and is made for "
                                      f"{g_name.lower()}.", *fillers]))
        category.append(g_name)
    return title, description, category


def rule_cell(history: list[int], genre, attribute) -> tuple[int, int]:
    """THE RULE's (genre, attribute) for a history of item ids, oldest first: the most
    frequent genre (ties: the one appearing first) and the newest item's attribute."""
    counts = Counter(genre[i] for i in history)  # insertion order = first appearance
    return max(counts, key=counts.__getitem__), attribute[history[-1]]


def _user_items(rng, draws, start: int, length: int, taste: tuple[int, int], cells, genre,
                attribute, noise: float, window: int, num_items: int) -> tuple[list, list]:
    """One user's item sequence and, per interaction, whether it followed the rule."""
    noise_u, pick_u = draws
    items, followed = [], []
    for t in range(length):
        recent = items[-window:]
        is_noise = t > 0 and noise_u[start + t] < noise
        candidates = []
        if not is_noise:
            cell = cells[taste if t == 0 else rule_cell(recent, genre, attribute)]
            seen = set(recent)
            candidates = [i for i in cell if i not in seen]
        if candidates:
            items.append(candidates[int(pick_u[start + t] * len(candidates))])
            followed.append(True)
            continue
        seen = set(recent)  # noise: uniform over the items not in the window
        while (item := int(rng.integers(1, num_items + 1))) in seen:
            pass
        items.append(item)
        followed.append(False)
    return items, followed


def make_synthetic(num_items: int, num_users: int, seed: int = 0, history_len=(5, 20),
                   num_genres: int = len(GENRES), num_attributes: int = len(ATTRIBUTES),
                   noise: float = 0.2, history_window: int = 20,
                   split_fractions=SPLIT_FRACTIONS) -> RecDataset:
    """The synthetic dataset of the module docstring; deterministic given the arguments."""
    _check(num_items, num_users, history_len, num_genres, num_attributes, noise, history_window)
    rng = np.random.default_rng(seed)
    # catalog: [n + 1] genre and attribute per item id, row 0 padding
    cell_of = np.r_[0, rng.permutation(np.arange(num_items) % (num_genres * num_attributes))]
    genre, attribute = cell_of // num_attributes, cell_of % num_attributes
    title, description, categories = _catalog_text(rng, genre, attribute)
    genre, attribute = genre.tolist(), attribute.tolist()
    cells = {}
    for i in range(1, num_items + 1):
        cells.setdefault((genre[i], attribute[i]), []).append(i)
    # users
    lengths = 1 + rng.integers(history_len[0], history_len[1] + 1, num_users)  # [U]
    genre_weights = 1.0 / np.sqrt(np.arange(1, num_genres + 1))
    taste_genre = rng.choice(num_genres, num_users, p=genre_weights / genre_weights.sum())
    taste_attr = rng.integers(0, num_attributes, num_users)
    total = int(lengths.sum())
    draws = (rng.random(total), rng.random(total))  # noise coin, pick within the candidates
    firsts = np.r_[0, np.cumsum(lengths)[:-1]]
    items, followed = [], []
    for u in range(num_users):
        seq, ok = _user_items(rng, draws, int(firsts[u]), int(lengths[u]),
                              (int(taste_genre[u]), int(taste_attr[u])), cells, genre,
                              attribute, noise, history_window, num_items)
        items += seq
        followed += ok
    item = np.asarray(items, dtype=np.int64)  # [T]
    followed = np.asarray(followed, dtype=bool)
    rating = np.where(followed, rng.choice(RULE_RATINGS, total, p=RULE_PROBS),
                      rng.choice(NOISE_RATINGS, total, p=NOISE_PROBS))
    user = np.repeat(np.arange(num_users), lengths)
    is_sample = np.ones(total, dtype=bool)  # [T] every interaction but a user's first
    is_sample[firsts] = False
    gaps = HOUR_MS + (rng.exponential(MEAN_GAP_MS, total)).astype(np.int64)
    gaps[firsts] = rng.integers(0, SPAN_MS, num_users)  # each user's start
    elapsed = np.cumsum(gaps)  # [T], restarted per user below
    timestamp = START_MS + elapsed - np.repeat(elapsed[firsts] - gaps[firsts], lengths)
    width = len(str(num_users - 1))
    splits = build_splits(user, item, timestamp, rating, [f"U{u:0{width}d}" for u in
                          range(num_users)], history_window, split_fractions)
    count = np.bincount(item, minlength=num_items + 1)
    total_rating = np.bincount(item, weights=rating, minlength=num_items + 1)
    average = np.divide(total_rating, count, out=np.zeros(num_items + 1), where=count > 0)
    catalog = ItemCatalog(title=title, description=description,
                          average_rating=np.round(average, 2).astype(np.float32),
                          rating_number=count.astype(np.int64), categories=categories)
    meta = {"builder": "synth-data", "seed": seed, "num_items": num_items,
            "num_users": num_users, "history_len": list(history_len),
            "num_genres": num_genres, "num_attributes": num_attributes, "noise": noise,
            "history_window": history_window, "split_fractions": list(split_fractions),
            "interactions": total, "rule_fraction": round(float(followed[is_sample].mean()), 4)}
    return RecDataset(catalog, splits, category=CATEGORY, meta=meta)


# ----------------------------------------------------------------------------- baselines


def item_facets(items: ItemCatalog) -> tuple[list[int], list[int]]:
    """Each item's genre and attribute index read back from its text (categories and the
    title's first word); raises ValueError for a catalog this module did not make."""
    genre_index = {g: k for k, (g, _) in enumerate(GENRES)}
    attr_index = {a: k for k, a in enumerate(ATTRIBUTES)}
    genre, attribute = [-1], [-1]
    for i in range(1, items.num_items + 1):
        g, a = items.categories[i], items.title[i].split(" ", 1)[0]
        if g not in genre_index or a not in attr_index:
            raise ValueError(f"item {i} ({items.title[i]!r}, category {g!r}) is not a synthetic "
                             "item: baselines() needs a dataset from make_synthetic")
        genre.append(genre_index[g])
        attribute.append(attr_index[a])
    return genre, attribute


def _score(rankings, targets, k: int) -> dict:
    hits, gains = 0, 0.0
    for ranking, target in zip(rankings, targets):
        if target in ranking[:k]:
            hits += 1
            gains += 1.0 / math.log2(ranking.index(target) + 2)
    rows = max(len(targets), 1)
    return {f"hit@{k}": hits / rows, f"ndcg@{k}": gains / rows}


def baselines(data: RecDataset, split: str = "test", k: int = 10) -> dict:
    """Hit@k and NDCG@k on `split` of (a) popularity: the most frequent train targets, minus
    the history; (b) rule: THE RULE applied to each history's item text, ranking the items of
    its cell not in the history by id (the process picks among them uniformly), nothing else.
    Neither sees the target."""
    if not _is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    genre, attribute = item_facets(data.items)
    cells = {}
    for i in range(1, data.items.num_items + 1):
        cells.setdefault((genre[i], attribute[i]), []).append(i)
    s = data[split]
    counts = np.bincount(data["train"].item_id, minlength=data.items.num_items + 1)
    counts[0] = -1  # padding never ranks
    popular = np.argsort(-counts, kind="stable").tolist()  # ties: lower id first
    targets = s.item_id.tolist()
    pop_rankings, rule_rankings = [], []
    for r in range(len(s)):
        history = s.history(r).tolist()
        seen = set(history)
        pop, j = [], 0
        while len(pop) < k and j < len(popular) - 1:
            if popular[j] not in seen:
                pop.append(popular[j])
            j += 1
        pop_rankings.append(pop)
        cell = cells.get(rule_cell(history, genre, attribute), [])
        rule_rankings.append([i for i in cell if i not in seen][:k])
    return {"split": split, "k": k, "rows": len(s), "popularity": _score(pop_rankings, targets, k),
            "rule": _score(rule_rankings, targets, k)}
