"""Instance graphs: hand-computed centroids, embeddings, cosines, edges and disagreements."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_graphkd.graph import (
    InstanceGraph,
    affinity_disagreement,
    agreement,
    at_size,
    cosine_matrix,
    edge_cosines,
    edge_vectors,
    graph_disagreement,
    instance_centroids,
    instance_embeddings,
    instance_graph,
    neighbour_edges,
)

torch.set_num_threads(1)

# 4x6 labels: id 2 is a 2x2 block, id 5 a 1x3 bar, id 7 a single pixel
LABELS = np.array(
    [
        [2, 2, 0, 0, 0, 0],
        [2, 2, 0, 5, 5, 5],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 7],
    ]
)


def test_centroids_by_hand():
    ids, cents = instance_centroids(LABELS)
    assert ids.tolist() == [2, 5, 7]
    np.testing.assert_allclose(cents, [[0.5, 0.5], [1.0, 4.0], [3.0, 5.0]])


def test_centroids_empty_and_bad_dims():
    ids, cents = instance_centroids(np.zeros((3, 3), int))
    assert ids.shape == (0,) and cents.shape == (0, 2)
    with pytest.raises(ValueError):
        instance_centroids(np.zeros((2, 2, 3, 3), int))


def test_volume_graphs_have_three_coordinates_by_hand():
    volume = np.zeros((3, 4, 6), dtype=np.int64)
    volume[0] = LABELS  # ids 2, 5, 7 in slice 0
    volume[1:, 0, 0] = 2  # id 2 grows down in z: 4 voxels at z=0, 2 more at z=1, 2
    volume[2, 3, 3] = 9
    ids, cents = instance_centroids(volume)
    assert ids.tolist() == [2, 5, 7, 9]
    np.testing.assert_allclose(cents, [[0.5, 1 / 3, 1 / 3], [0, 1, 4], [0, 3, 5], [2, 3, 3]])
    emb = np.zeros((2, 3, 4, 6), dtype=np.float32)
    emb[0] = 1.0
    emb[1][volume == 9] = 1.0  # node 9 at 45 degrees from the others
    graph = instance_graph(emb, volume, k=1)
    assert graph.centroids.shape == (4, 3) and graph.edges.shape[1] == 2
    np.testing.assert_allclose(graph.similarity, [np.sqrt(0.5) if 3 in e else 1.0 for e in graph.edges.tolist()])
    assert edge_vectors(graph.centroids, graph.edges).shape == (len(graph.edges), 2, 3)
    assert at_size(emb, (6, 8, 12)).shape == (2, 6, 8, 12)


def test_agreement_of_volumes_counts_3d_objects():
    a = np.zeros((2, 4, 4), int)
    a[:, 1:3, 1:3] = 1  # one object through both planes
    b = a.copy()
    b[1] *= 2  # split across z: another id in the second plane
    planes = agreement(a, b)
    assert planes["f1"] == 1.0 and planes["n_b"] == 1.0  # plane by plane both match
    volume = agreement(a, b, volume=True)
    assert volume["n_a"] == 1.0 and volume["n_b"] == 2.0  # as volumes: split in two halves (IoU 0.5 each)
    assert volume["f1"] == pytest.approx(2 / 3) and volume["aji"] == pytest.approx(4 / 12)  # one match of 1 + 2 objects


def test_instance_embeddings_are_means():
    emb = np.zeros((2, 4, 6), dtype=np.float32)
    emb[0] = np.arange(24).reshape(4, 6)  # value = 6*y + x
    emb[1] = 1.0
    emb[1, 1, 1] = 5.0  # inside instance 2
    means = instance_embeddings(emb, LABELS)
    # id 2 pixels: 0,1,6,7 -> mean 3.5; channel 1: (1+1+1+5)/4 = 2
    # id 5 pixels: 9,10,11 -> 10;  id 7 pixel: 23
    np.testing.assert_allclose(means, [[3.5, 2.0], [10.0, 1.0], [23.0, 1.0]])
    with pytest.raises(ValueError):
        instance_embeddings(emb[:, :3], LABELS)


def test_cosine_matrix_and_edge_cosines():
    v = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    s = 1 / np.sqrt(2)
    expected = np.array([[1, s, 0, 0], [s, 1, s, 0], [0, s, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(cosine_matrix(v), expected, atol=1e-12)
    np.testing.assert_allclose(edge_cosines(v, np.array([[0, 1], [0, 2], [1, 2]])), [s, 0, s])


def test_neighbour_edges_k_and_distance():
    # points on a line at x = 0, 1, 3, 10
    pts = np.array([[0, 0], [0, 1], [0, 3], [0, 10]], dtype=float)
    # k=1: 0->1, 1->0, 2->1, 3->2  => {0,1}, {1,2}, {2,3}
    assert neighbour_edges(pts, k=1).tolist() == [[0, 1], [1, 2], [2, 3]]
    # within distance 2.5: the far point (7 px away) is left out
    assert neighbour_edges(pts, k=1, max_distance=2.5).tolist() == [[0, 1], [1, 2]]
    # k=2: 0 -> 1, 2;  1 -> 0, 2;  2 -> 1, 0;  3 -> 2 (7 px), 1 (9 px)
    assert neighbour_edges(pts, k=2).tolist() == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]
    assert neighbour_edges(pts[:1]).shape == (0, 2)
    with pytest.raises(ValueError):
        neighbour_edges(pts, k=0)


def test_instance_graph_and_disagreement():
    emb = np.zeros((2, 4, 6), dtype=np.float32)
    emb[0][LABELS == 2] = 1.0  # node 0: (1, 0)
    emb[:, LABELS == 5] = 1.0  # node 1: (1, 1)
    emb[1][LABELS == 7] = 3.0  # node 2: (0, 3)
    graph = instance_graph(emb, LABELS, k=1)
    assert isinstance(graph, InstanceGraph)
    assert graph.ids.tolist() == [2, 5, 7]
    # centroid distances: 0-1 = sqrt(0.25+12.25)=3.54, 0-2 = 5.15, 1-2 = 2.24 -> nearest: 0->1, 1->2, 2->1
    assert graph.edges.tolist() == [[0, 1], [1, 2]]
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(graph.similarity, [s, s])
    # the student moves node 2 to (1, 1): edge 0-1 keeps cos s, edge 1-2 goes from s to 1
    emb_s = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(graph_disagreement(graph, emb_s), [0.0, 1 - s])
    with pytest.raises(ValueError):
        graph_disagreement(graph, emb_s[:2])


def test_edge_vectors():
    cents = np.array([[0.0, 0.0], [2.0, 1.0], [5.0, 5.0]])
    vec = edge_vectors(cents, np.array([[0, 1], [1, 2]]))
    np.testing.assert_allclose(vec, [[[0, 0], [2, 1]], [[2, 1], [3, 4]]])


def test_affinity_disagreement():
    a = np.zeros((2, 2, 2))
    b = np.zeros((2, 2, 2))
    b[0, 0, 0] = 0.5
    b[1, 0, 0] = -0.75
    b[1, 1, 1] = 0.25
    np.testing.assert_allclose(affinity_disagreement(a, b), [[0.75, 0.0], [0.0, 0.25]])
    with pytest.raises(ValueError):
        affinity_disagreement(a, b[:1])


def test_at_size():
    maps = np.ones((3, 5, 4), dtype=np.float32)
    assert at_size(maps, (5, 4)) is maps
    up = at_size(maps, (10, 8))
    assert up.shape == (3, 10, 8) and up.dtype == np.float32
    np.testing.assert_allclose(up, 1.0)


def test_agreement_by_hand():
    a = np.zeros((10, 10), int)
    a[0:4, 0:4] = 1  # 16 px
    a[6:10, 6:10] = 2  # 16 px
    b = a.copy()
    b[b == 2] = 0  # the student misses object 2
    scores = agreement(a, b)
    # 1 TP, 0 FP, 1 FN: F1 = 2/(2+0+1) = 2/3; AJI = 16 / (16 + 16) = 0.5
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["aji"] == pytest.approx(0.5)
    assert (scores["n_a"], scores["n_b"]) == (2, 1)
    stack = agreement(np.stack([a, a]), np.stack([a, b]))
    assert stack["f1"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError):
        agreement(a, b[:5])
