"""Retrieval evaluation with BLIP's protocol: ITC top-k, ITM rerank, recall@K (distributed)."""

from blip_recipes.evaluation.metrics import (
    RECALL_KS,
    positive_ranks,
    recall_at,
    retrieval_metrics,
)
from blip_recipes.evaluation.retrieval import RetrievalScores, evaluate_retrieval, score_retrieval
from blip_recipes.evaluation.retrieval_data import RetrievalData, load_retrieval_data

__all__ = [
    "RECALL_KS",
    "RetrievalData",
    "RetrievalScores",
    "evaluate_retrieval",
    "load_retrieval_data",
    "positive_ranks",
    "recall_at",
    "retrieval_metrics",
    "score_retrieval",
]
