"""GG statistics of a model's activations and gradients on a task (``ggprior fit --activations/--gradients``)."""

from __future__ import annotations

from ..stats.hooks import activation_statistics, gradient_statistics
from .data import DataError, batches, load_task
from .models import load_minilm
from .tokenizer import get_tokenizer

KINDS = ("activations", "gradients")
RUNTIME_COLUMNS = ["name", "kind", "group", "numel", "mu", "beta", "gamma", "std", "gamma_at_bound", "entropy_bits",
                   "mu_mle", "beta_mle", "gamma_mle", "loglik_gg_mle", "loglik_gg", "loglik_gauss", "loglik_laplace",
                   "ks_gg", "ks_gauss", "ks_laplace", "best_law", "note"]


def task_statistics(source: str, kinds: list[str], task: str, examples: int = 64, batch_size: int = 16, *,
                    seed: int = 0, mle: bool = False) -> tuple[list[dict], int]:
    """GG rows of ``source``'s activations and/or gradients (``kinds``) over ``examples`` training
    examples of ``task``; returns (rows, number of examples). Only the built-in ``minilm`` runs."""
    if source != "minilm":
        raise DataError(f"--activations/--gradients run the model: only the built-in 'minilm' is supported, "
                        f"got {source!r}")
    tok = get_tokenizer("minilm")
    data = load_task(task, "train", tok, 128, max_examples=examples)
    if data.kind != "classification":
        raise DataError(f"task {task!r} is a language-modelling corpus; MiniLM needs a classification task")
    model = load_minilm(max(data.num_labels, 2))
    rows = []
    if "activations" in kinds:
        rows += activation_statistics(model, lambda: batches(data, batch_size), seed=seed, mle=mle)
    if "gradients" in kinds:
        rows += gradient_statistics(model, lambda: batches(data, batch_size), seed=seed, mle=mle)
    return rows, len(data)
