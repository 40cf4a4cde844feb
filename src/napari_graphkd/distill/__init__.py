"""Knowledge distillation for embedding networks: GRD (intra/inter IGD and AGD) and published baselines."""
from __future__ import annotations

from .agd import agd_loss
from .baselines import Adapter, attention_map, attention_transfer_loss, cwd_loss, mimic_loss, skd_pairwise_loss
from .igd import (
    batch_nodes,
    cosine_matrix,
    edge_loss,
    edge_matrix,
    graph_losses,
    igd_loss,
    instance_nodes,
    node_loss,
    resize_labels,
)
from .inter import inter_agd_loss, inter_igd_loss, pooled_gram
from .memory import MemoryBank, MemoryItem
from .objective import (
    BASELINE_WEIGHTS,
    METHODS,
    DistillationObjective,
    DistillWeights,
    NetOut,
    distillation_resolutions,
    make_adapter,
    match_stages,
    method_weights,
)

__all__ = [
    "Adapter",
    "BASELINE_WEIGHTS",
    "DistillWeights",
    "DistillationObjective",
    "METHODS",
    "MemoryBank",
    "MemoryItem",
    "NetOut",
    "agd_loss",
    "attention_map",
    "attention_transfer_loss",
    "batch_nodes",
    "cosine_matrix",
    "cwd_loss",
    "distillation_resolutions",
    "edge_loss",
    "edge_matrix",
    "graph_losses",
    "igd_loss",
    "instance_nodes",
    "inter_agd_loss",
    "pooled_gram",
    "inter_igd_loss",
    "make_adapter",
    "match_stages",
    "method_weights",
    "mimic_loss",
    "node_loss",
    "resize_labels",
    "skd_pairwise_loss",
]
