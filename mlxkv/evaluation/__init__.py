"""``mlxkv eval``'s measurements: quality metrics, passkey retrieval, reports."""

from .metrics import REFERENCE, EvalRow, kl_divergence, kv_elements, log_softmax, nll, perplexity, quality
from .passkey import passkey, passkey_prompt
from .report import markdown_table, plot, write_json

__all__ = ["REFERENCE", "EvalRow", "kl_divergence", "kv_elements", "log_softmax", "markdown_table",
           "nll", "passkey", "passkey_prompt", "perplexity", "plot", "quality", "write_json"]
