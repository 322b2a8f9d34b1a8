"""Public, autograd-aware ops with backend dispatch (DESIGN §3-4)."""
from r2ec_fast.ops._backend import BACKENDS, resolve_backend
from r2ec_fast.ops.catalog import (
    CatalogScores,
    catalog_log_prob,
    catalog_log_prob_reference,
    in_batch_log_prob,
    reference_trainer_rewards,
    score_catalog,
    score_catalog_reference,
)
from r2ec_fast.ops.item_table import ItemTable
from r2ec_fast.ops.token_logp import (
    TokenLoss,
    linear_log_probs,
    linear_log_probs_reference,
    recpo_token_loss,
)

__all__ = [
    "BACKENDS", "CatalogScores", "ItemTable", "catalog_log_prob", "catalog_log_prob_reference",
    "in_batch_log_prob", "reference_trainer_rewards", "resolve_backend", "score_catalog",
    "score_catalog_reference", "TokenLoss", "linear_log_probs", "linear_log_probs_reference",
    "recpo_token_loss",
]
