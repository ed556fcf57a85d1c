"""Sequential recommendation on omniattn: HSTU and SASRec, data, training, M-FALCON inference."""

from .data import Interactions, Split, load, movielens_1m, movielens_20m, movielens_100k, synthetic
from .mfalcon import candidate_representations, score_candidates
from .models import HSTU, SASRec
from .train import TrainConfig, Trainer, evaluate, load_model, popularity_metrics

__all__ = [
    "HSTU", "SASRec", "Interactions", "Split", "TrainConfig", "Trainer", "evaluate", "popularity_metrics",
    "load", "load_model", "synthetic", "movielens_100k", "movielens_1m", "movielens_20m",
    "candidate_representations", "score_candidates",
]
