"""Instance graphs of label images and teacher-vs-student comparisons (pure numpy/scipy).

An instance graph has one node per object (its centroid and its mean pixel embedding) and edges
between near neighbours, each carrying the cosine similarity of the two node embeddings. Nodes
are always ordered by increasing label id, so arrays from different functions line up. Label
images (H,W) and label volumes (D,H,W) alike: centroids have 2 or 3 coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .metrics import evaluate, mean_metrics


@dataclass(frozen=True, eq=False)
class InstanceGraph:
    """Nodes (ids, centroids, mean embeddings) and neighbour edges with their cosine similarity."""

    ids: np.ndarray  # (N,) label ids, increasing
    centroids: np.ndarray  # (N,2) y, x or (N,3) z, y, x
    embeddings: np.ndarray  # (N,C) mean embedding per instance
    edges: np.ndarray  # (E,2) node index pairs i < j
    similarity: np.ndarray  # (E,) cosine similarity of the two node embeddings


def _instance_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Increasing nonzero ids and, per pixel (flattened), the node index of its label (-1 = background)."""
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"expected a 2D label image or a 3D label volume, got shape {labels.shape}")
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    if len(ids) and ids[0] == 0:
        return ids[1:], inverse.ravel() - 1
    return ids, inverse.ravel()


def instance_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label ids (N,) and centroids (N,ndim) in pixel coordinates: (y, x), or (z, y, x) for volumes."""
    ids, index = _instance_index(labels)
    fg = index >= 0
    counts = np.bincount(index[fg], minlength=len(ids))
    grids = np.indices(np.shape(labels)).reshape(np.ndim(labels), -1)
    sums = [np.bincount(index[fg], weights=g[fg], minlength=len(ids)) for g in grids]
    return ids, np.stack(sums, axis=1) / np.maximum(counts, 1)[:, None]


def instance_embeddings(embedding: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean embedding (N,C) of each instance of ``labels`` (embedding (C,*spatial) of the same size)."""
    if embedding.shape[1:] != np.shape(labels):
        raise ValueError(f"embedding {embedding.shape} and labels {np.shape(labels)} differ in size")
    ids, index = _instance_index(labels)
    fg = index >= 0
    counts = np.maximum(np.bincount(index[fg], minlength=len(ids)), 1)
    flat = embedding.reshape(embedding.shape[0], -1)[:, fg]
    sums = np.stack([np.bincount(index[fg], weights=channel, minlength=len(ids)) for channel in flat], axis=1)
    return sums / counts[:, None]


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """(N,N) cosine similarities between the rows of ``vectors`` (0 for zero rows)."""
    unit = _unit(vectors)
    return unit @ unit.T


def edge_cosines(vectors: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(E,) cosine similarity of the row pairs ``edges`` (without building the N x N matrix)."""
    unit = _unit(vectors)
    return np.einsum("ec,ec->e", unit[edges[:, 0]], unit[edges[:, 1]])


def neighbour_edges(centroids: np.ndarray, k: int = 4, max_distance: float | None = None) -> np.ndarray:
    """Undirected edges (E,2), i < j, from each point (2 or 3 coordinates) to its ``k`` nearest others within ``max_distance``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    centroids = np.asarray(centroids, dtype=np.float64)
    centroids = centroids.reshape(-1, centroids.shape[-1] if centroids.ndim == 2 else 2)
    n = len(centroids)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    bound = np.inf if max_distance is None else float(max_distance)
    _, neighbours = cKDTree(centroids).query(centroids, k=min(k + 1, n), distance_upper_bound=bound)
    source = np.repeat(np.arange(n), neighbours.shape[1])
    target = neighbours.ravel()
    keep = (target < n) & (target != source)
    pairs = np.sort(np.stack([source[keep], target[keep]], axis=1), axis=1)
    return np.unique(pairs, axis=0).astype(np.int64).reshape(-1, 2)


def instance_graph(embedding: np.ndarray, labels: np.ndarray, k: int = 4, max_distance: float | None = None) -> InstanceGraph:
    """Instance graph of ``labels`` with node embeddings averaged from ``embedding`` (C,*spatial)."""
    ids, centroids = instance_centroids(labels)
    embeddings = instance_embeddings(embedding, labels)
    edges = neighbour_edges(centroids, k, max_distance)
    return InstanceGraph(ids, centroids, embeddings, edges, edge_cosines(embeddings, edges))


def graph_disagreement(graph_t: InstanceGraph, emb_s: np.ndarray) -> np.ndarray:
    """Per-edge |cos_T - cos_S|, with ``emb_s`` the student's (N,C) mean embeddings of the same instances."""
    if len(emb_s) != len(graph_t.ids):
        raise ValueError(f"student embeddings have {len(emb_s)} nodes, the graph has {len(graph_t.ids)}")
    return np.abs(graph_t.similarity - edge_cosines(emb_s, graph_t.edges))


def affinity_disagreement(aff_t: np.ndarray, aff_s: np.ndarray) -> np.ndarray:
    """(*spatial) largest |A_T - A_S| over the offsets of two (K,*spatial) affinity maps."""
    if aff_t.shape != aff_s.shape:
        raise ValueError(f"affinity maps differ in shape: {aff_t.shape} vs {aff_s.shape}")
    return np.abs(aff_t - aff_s).max(axis=0)


def edge_vectors(centroids: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(E,2,D) start point and displacement of each edge (the layout of napari Vectors)."""
    start = centroids[edges[:, 0]]
    return np.stack([start, centroids[edges[:, 1]] - start], axis=1)


def at_size(maps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C,*spatial) maps resampled (bi/tri)linearly to (C,*shape); returned unchanged when already that size."""
    if maps.shape[1:] == tuple(shape):
        return maps
    zoom = (1.0, *(n / m for n, m in zip(shape, maps.shape[1:])))
    return ndi.zoom(maps, zoom, order=1, grid_mode=True, mode="nearest").astype(maps.dtype, copy=False)


def agreement(labels_a: np.ndarray, labels_b: np.ndarray, volume: bool = False) -> dict[str, float]:
    """F1@0.5, AJI and object counts of ``labels_b`` against reference ``labels_a`` (stacks: mean over planes;
    a ``volume``: its 3D objects)."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"label images differ in shape: {a.shape} vs {b.shape}")
    planes = [evaluate(a, b)] if a.ndim == 2 or volume else [evaluate(pa, pb) for pa, pb in zip(a, b)]
    scores = mean_metrics(planes)
    return {"f1": scores["f1@0.5"], "aji": scores["aji"], "n_a": scores["n_gt"], "n_b": scores["n_pred"]}
