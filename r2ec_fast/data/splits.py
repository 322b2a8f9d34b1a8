"""From an interaction log to the train/valid/test splits of the reference format (DESIGN §6):
every interaction after a user's first is a sample whose history is the previous
`history_window` interactions (newest last); samples are split 80/10/10 in time order.
Shared by prepare-data (amazon.py) and synth-data (synthetic.py)."""
from __future__ import annotations

import math

import numpy as np

from r2ec_fast.data.dataset import SPLITS, Split

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def split_bounds(num_samples: int, split_fractions=SPLIT_FRACTIONS) -> list[int]:
    """[0, n_train, n_train + n_valid, n]: cuts at the cumulative fractions, rounded half up.
    Raises ValueError when a split would be empty."""
    cum = np.cumsum(split_fractions)[:-1]
    bounds = [0, *(int(math.floor(num_samples * c + 0.5)) for c in cum), num_samples]
    sizes = np.diff(bounds)
    if (sizes <= 0).any():
        raise ValueError(f"{num_samples} samples are too few for the split fractions "
                         f"{tuple(split_fractions)}: split sizes would be {sizes.tolist()}")
    return bounds


def build_splits(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, rating: np.ndarray,
                 user_ids: list[str], history_window: int = 20,
                 split_fractions=SPLIT_FRACTIONS, tiebreak: np.ndarray | None = None,
                 ) -> dict[str, Split]:
    """The train/valid/test splits of an interaction log (protocol steps 4 and 5).

    user: [n] int codes whose order is the user tie-break; user_ids[code] is the name.
    item: [n] item ids (1..). timestamp: [n] int64. rating: [n]. tiebreak: [n] order of
    interactions with equal (user, timestamp); default: their order in the arrays.
    """
    n = len(item)
    tiebreak = np.arange(n) if tiebreak is None else tiebreak
    order = np.lexsort((tiebreak, timestamp, user))  # per user, oldest first
    user, item = np.asarray(user)[order], np.asarray(item, dtype=np.int64)[order]
    timestamp = np.asarray(timestamp, dtype=np.int64)[order]
    rating = np.asarray(rating, dtype=np.float32)[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])  # first row of each user
    position = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # [n]
    target = np.flatnonzero(position >= 1)  # [S] the row of each sample's target
    target = target[np.lexsort((position[target], user[target], timestamp[target]))]
    history_len = np.minimum(position[target], history_window)  # [S]
    bounds = split_bounds(len(target), split_fractions)
    splits = {}
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:]):
        rows, lengths = target[lo:hi], history_len[lo:hi]
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)  # [R + 1]
        # row r's history: rows[r] - lengths[r] .. rows[r] - 1, oldest first
        flat = (np.repeat(rows - lengths, lengths)
                + np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths))
        splits[name] = Split(
            user_id=[user_ids[u] for u in user[rows].tolist()], history_offsets=offsets,
            history_item_id=item[flat], history_rating=rating[flat],
            history_timestamp=timestamp[flat], item_id=item[rows], rating=rating[rows],
            timestamp=timestamp[rows], interaction_id=np.arange(lo, hi, dtype=np.int64))
    return splits
