"""Stitching chunk labels into global instance ids: overlap matching in the halo, union-find, relabelling.

Each chunk is segmented with a halo and keeps its core. Where two neighbouring chunks' haloed boxes
overlap, both segmented the same pixels; an object of one and an object of the other, both present
in their own chunk's core, are the same nucleus when their pixels there, inside either core, overlap
with IoU above ``MATCH_IOU``. Those pairs are merged by connected components over (chunk, id)
nodes, so an object crossing a chunk border gets one id (never split) and appears once (never
duplicated).
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

MATCH_IOU = 0.5  # IoU > 0.5 pairs each object with at most one object of the other chunk


def matching_pairs(a: np.ndarray, b: np.ndarray, region: np.ndarray, threshold: float = MATCH_IOU) -> np.ndarray:
    """(k, 2) pairs (id in ``a``, id in ``b``) of objects whose pixels inside ``region`` overlap with IoU > threshold."""
    a, b = a[region].astype(np.int64), b[region].astype(np.int64)
    size_a, size_b = np.bincount(a), np.bincount(b)
    both = (a > 0) & (b > 0)
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    iou = inter / (size_a[pairs[0]] + size_b[pairs[1]] - inter)
    return pairs[:, iou > threshold].T


def global_ids(counts: list[int], present: list[np.ndarray], edges: np.ndarray) -> list[np.ndarray]:
    """Per chunk a lookup table local id -> global id (1..N in order of first appearance, 0 = background).

    ``counts[i]`` is chunk i's largest local id, ``present[i]`` the ids found in its core (only those
    get global ids), ``edges`` (k, 2) the matched (node, node) pairs, node = offset of chunk + local id.
    """
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64) + 1)])
    n = int(offsets[-1])
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    graph = sparse.coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    nodes = np.concatenate([offsets[i] + np.asarray(p, dtype=np.int64) for i, p in enumerate(present)] + [np.zeros(0, np.int64)])
    nodes = nodes[np.concatenate([np.asarray(p) for p in present] + [np.zeros(0)]) > 0]
    components, first = np.unique(component[nodes], return_index=True)
    order = np.argsort(first)  # number components by their first present node (raster order of chunks)
    number = np.zeros(component.max(initial=0) + 1, dtype=np.int64)
    number[components[order]] = np.arange(1, len(components) + 1)
    tables = []
    for i in range(len(counts)):
        table = number[component[offsets[i] : offsets[i + 1]]]
        table[0] = 0
        tables.append(table)
    return tables


def node_offsets(counts: list[int]) -> np.ndarray:
    """Offset of each chunk's local ids in the node numbering used by :func:`global_ids`."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64) + 1)])[:-1]
