"""Visual Dialog v1.0 retrieval metrics, as the VisDial evaluation computes them.

A model ranks the 100 candidate answers of each question (here: generatively, by the
log-likelihood of each candidate). From the ranks:

* sparse metrics, over every round with a ground-truth answer (``gt_index``): R@1, R@5, R@10
  (the share of rounds whose true answer is ranked within the top k), mean rank of the true
  answer and MRR (mean of 1 / rank), as ``SparseGTMetrics`` of the VisDial challenge starter
  code (batra-mlp-lab/visdial-challenge-starter-pytorch, ``visdialch/metrics.py``);
* NDCG, over the rounds with dense relevance annotations (v1.0 val: one round per image,
  ``visdial_1.0_val_dense_annotations.json``), as that file's ``NDCG``: with K the number of
  candidates of non-zero relevance, DCG@K of the predicted order, sum of relevance / log2(i + 1)
  over positions i = 1..K, divided by the DCG@K of the ideal order (relevance sorted descending).

R@k, MRR and NDCG are reported in percent (the leaderboard's scale), the mean rank as is.
Ties between equal scores are broken by candidate order (a stable sort), where the starter code
leaves the order to ``torch.sort``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["ranks_from_scores", "ndcg", "score_visdial", "RECALL_KS"]

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """The rank (1 = best) of each candidate when sorted by descending score (ties: earlier first)."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    ranks = [0] * len(scores)
    for position, index in enumerate(order, start=1):
        ranks[index] = position
    return ranks


def _dcg(relevance_in_order: Sequence[float]) -> float:
    return sum(rel / math.log2(position + 1) for position, rel in enumerate(relevance_in_order, start=1))


def ndcg(ranks: Sequence[int], relevance: Sequence[float]) -> float:
    """NDCG@K of one round, K = number of candidates with non-zero relevance (VisDial's NDCG)."""
    if len(ranks) != len(relevance):
        raise ValueError(f"{len(ranks)} ranks for {len(relevance)} relevance values")
    k = sum(1 for r in relevance if r != 0)
    if k == 0:
        raise ValueError("a dense annotation with no relevant candidate has no NDCG")
    predicted_order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    predicted = _dcg([float(relevance[i]) for i in predicted_order[:k]])
    ideal = _dcg(sorted((float(r) for r in relevance), reverse=True)[:k])
    return predicted / ideal


def score_visdial(items: Iterable[tuple[Sequence[float], int | None, Sequence[float] | None]]) -> dict[str, object]:
    """Score ``(candidate_scores, gt_index, relevance)`` per round; ``gt_index`` (0-based) or
    ``relevance`` may be None where the round has none.

    Returns ``MRR``, ``R@1``, ``R@5``, ``R@10`` (percent), ``mean_rank``, ``num_rounds`` over the
    rounds with a ground-truth answer, and ``NDCG`` (percent) with ``num_dense_rounds`` over the
    rounds with relevance (None when there are none).
    """
    gt_ranks: list[int] = []
    ndcgs: list[float] = []
    for scores, gt_index, relevance in items:
        ranks = ranks_from_scores(scores)
        if gt_index is not None:
            if not 0 <= gt_index < len(ranks):
                raise ValueError(f"gt_index {gt_index} outside the {len(ranks)} candidates")
            gt_ranks.append(ranks[gt_index])
        if relevance is not None:
            ndcgs.append(ndcg(ranks, relevance))
    if not gt_ranks and not ndcgs:
        raise ValueError("no VisDial rounds with a ground-truth answer or relevance to score")
    out: dict[str, object] = {}
    if gt_ranks:
        n = len(gt_ranks)
        out["MRR"] = 100.0 * sum(1.0 / r for r in gt_ranks) / n
        for k in RECALL_KS:
            out[f"R@{k}"] = 100.0 * sum(1 for r in gt_ranks if r <= k) / n
        out["mean_rank"] = sum(gt_ranks) / n
    else:
        out.update({"MRR": None, **{f"R@{k}": None for k in RECALL_KS}, "mean_rank": None})
    out["NDCG"] = 100.0 * sum(ndcgs) / len(ndcgs) if ndcgs else None
    out["num_rounds"] = len(gt_ranks)
    out["num_dense_rounds"] = len(ndcgs)
    return out
