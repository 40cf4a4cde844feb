"""Partial-annotation rules, the held-out split and held-out metrics, on tiny hand-made label maps."""
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_graphkd.io.checkpoint import save_checkpoint
from napari_graphkd.models import UNetConfig, build_model
from napari_graphkd.inference import prepare_image
from napari_graphkd.preprocess import InputError
from napari_graphkd.train.distill import graph_labels, with_pseudo_labels
from napari_graphkd.train.finetune.rules import annotation_scores
from napari_graphkd.train.finetune import (
    AnnotatedImage,
    FinetuneSettings,
    annotated_window,
    annotation_map,
    heldout_metrics,
    plan_finetune,
    pseudo_instances,
    split_cells,
)


def test_margin_around_painted_cells_is_background_and_the_rest_is_unannotated():
    labels = np.zeros((20, 20), np.int32)
    labels[8:11, 8:11] = 5
    out = annotation_map(labels, margin=2)
    assert (out[8:11, 8:11] == 5).all()
    assert out[8, 6] == 0 and out[6, 9] == 0 and out[12, 10] == 0  # 2 px away
    assert out[8, 5] == -1 and out[6, 6] == -1  # 3 px and 2.8 px away
    assert out[0, 0] == -1 and out[19, 19] == -1


def test_checked_regions_make_unpainted_pixels_background():
    labels = np.zeros((20, 20), np.int32)
    labels[2:4, 2:4] = 1
    checked = np.zeros((20, 20), bool)
    checked[10:20, 0:10] = True
    out = annotation_map(labels, checked, margin=0)
    assert (out[10:20, 0:10] == 0).all()
    assert (out[2:4, 2:4] == 1).all()
    assert (out[:10] == -1).sum() == 200 - 4 and (out[:, 10:] == -1).all()


def test_heldout_split_is_deterministic_disjoint_and_a_fifth():
    labels = np.zeros((8, 60), np.int32)
    for i in range(12):
        labels[2:5, 5 * i : 5 * i + 3] = 10 + i
    train, held = split_cells(labels)
    again_train, again_held = split_cells(labels.copy())
    assert len(held) == 2 and len(train) == 10
    np.testing.assert_array_equal(held, again_held)
    np.testing.assert_array_equal(train, again_train)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(10, 22))
    assert len(split_cells(labels[:, :5])[1]) == 1  # one painted cell: it is held out


@pytest.fixture()
def tiny(tmp_path):
    """(teacher, student) tiny random checkpoints trained (nominally) at nucleus diameter 10."""
    torch.manual_seed(0)
    model = build_model(UNetConfig(widths=(4, 8), stem_stride=2))
    return [save_checkpoint(tmp_path / f"{n}.safetensors", model, {"train_diameter": 10.0}) for n in ("t", "s")]


def cells_image(n: int = 10, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic image with ``n`` square 'nuclei' of 8x8 px and their labels."""
    labels = np.zeros((size, size), np.int32)
    for i in range(n):
        y, x = 10 + 40 * (i // 5), 4 + 18 * (i % 5)
        labels[y : y + 8, x : x + 8] = i + 1
    return (labels > 0).astype(np.float32) + 0.1, labels


def test_plan_holds_cells_and_their_band_out_of_training(tiny):
    image, labels = cells_image()
    plan = plan_finetune([AnnotatedImage("a", image, labels)], FinetuneSettings(margin=3, diameter=10.0), *tiny)
    held = np.unique(plan.heldout.cells[plan.heldout.cells > 0])
    assert len(held) == 2 and plan.train_cells == 8 and plan.painted_cells == 10 and plan.scale == 1.0
    train = plan.train[0].labels
    assert train.shape == labels.shape  # the annotated window spans the whole image here
    assert set(np.unique(train[train > 0])) == set(range(1, 11)) - set(held)
    band = ndi.distance_transform_edt(~np.isin(labels, held)) <= 4  # max(margin, 4) px around held-out cells
    assert (train[band] == -1).all()
    kept = np.isin(labels, [c for c in range(1, 11) if c not in held])
    margin = (ndi.distance_transform_edt(~kept) <= 3) & ~kept
    assert (train[margin] == 0).all() and (train[~margin & ~kept] == -1).all()


def test_plan_with_two_images_holds_the_last_one_out(tiny):
    image, labels = cells_image()
    items = [AnnotatedImage("a", image, labels), AnnotatedImage("b", image, labels[::-1].copy())]
    plan = plan_finetune(items, FinetuneSettings(diameter=10.0), *tiny)
    assert len(plan.train) == 1 and plan.heldout.name == "b" and plan.heldout.whole_image
    np.testing.assert_array_equal(plan.heldout.cells, labels[::-1])
    assert plan.train_cells == 10


def test_distil_mode_ignores_the_annotation_in_training(tiny):
    image, labels = cells_image()
    plan = plan_finetune([AnnotatedImage("a", image, labels)], FinetuneSettings(mode="distil", diameter=10.0), *tiny)
    assert (plan.train[0].labels == -1).all()


def test_diameter_rescales_images_and_labels(tiny):
    image, labels = cells_image()
    plan = plan_finetune([AnnotatedImage("a", image, labels)], FinetuneSettings(diameter=5.0), *tiny)
    whole = plan.student_train[0]  # (plan.train is cut to the window around the annotated pixels)
    assert plan.scale == 2.0 and whole.image.shape == (192, 192) == whole.labels.shape
    measured = plan_finetune([AnnotatedImage("a", image, labels)], FinetuneSettings(), *tiny)
    assert measured.diameter == pytest.approx(2 * np.sqrt(64 / np.pi))  # median equivalent diameter of 8x8 squares


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no painted cell"),
        ("size", "has shape"),
        ("checked size", "checked regions"),
        ("checked empty", "cover no pixel"),
        ("small", "too small"),
        ("negative", "non-negative"),
        ("one cell", "no painted cell is left"),
        ("unpainted last", "held out for scoring"),
        ("rgb size", "has shape"),
    ],
)
def test_bad_annotations_are_refused_with_the_reason(tiny, case, message):
    image, labels = cells_image()
    one = np.where(labels == 1, 1, 0)
    items = {
        "empty": [AnnotatedImage("a", image, np.zeros_like(labels))],
        "size": [AnnotatedImage("a", image, labels[:50])],
        "checked size": [AnnotatedImage("a", image, labels, np.ones((5, 5), bool))],
        "checked empty": [AnnotatedImage("a", image, labels, np.zeros(labels.shape, bool))],
        "small": [AnnotatedImage("a", image[:40, :40], labels[:40, :40])],
        "negative": [AnnotatedImage("a", image, labels - 1)],
        "one cell": [AnnotatedImage("a", image, one)],
        "unpainted last": [AnnotatedImage("a", image, labels), AnnotatedImage("b", image, np.zeros_like(labels))],
        "rgb size": [AnnotatedImage("a", np.zeros((90, 96, 3), np.uint8), labels)],
    }[case]
    with pytest.raises(InputError, match=message):
        plan_finetune(items, FinetuneSettings(diameter=10.0), *tiny)


def test_heldout_metrics_by_hand():
    cells = np.zeros((12, 12), np.int32)
    cells[0:4, 0:4] = 1  # 16 px
    cells[8:10, 8:10] = 2  # 4 px
    pred = np.zeros_like(cells)
    pred[0:4, 0:3] = 7  # 12 px inside cell 1: IoU 12/16 = 0.75
    pred[8:10, 7:12] = 3  # 10 px covering cell 2: IoU 4/10 = 0.4
    pred[5:7, 0:2] = 9  # touches no held-out cell: cannot be judged
    scores = heldout_metrics(cells, pred)
    assert scores["recall@0.5"] == 0.5 and scores["cells"] == 2
    assert scores["mean_iou"] == pytest.approx((0.75 + 0.4) / 2)
    assert scores["aji"] == pytest.approx((12 + 4) / (16 + 10))  # prediction 9 is left out of the union


def test_retuning_scores_count_false_positives_on_checked_background_only():
    annotation = np.full((12, 12), -1, np.int32)
    annotation[0:6, 0:6] = 0  # a checked region
    annotation[0:4, 0:4] = 1  # a painted cell in it
    pred = np.zeros_like(annotation)
    pred[0:4, 0:3] = 7  # matches cell 1 (IoU 0.75)
    pred[8:12, 8:12] = 5  # on unannotated pixels: cannot be judged
    clean = annotation_scores(annotation, pred)
    assert clean["recall@0.5"] == clean["precision@0.5"] == clean["f1@0.5"] == 1.0
    assert clean["aji"] == pytest.approx(12 / 16)
    pred[4:6, 4:6] = 9  # on checked background: a false positive
    noisy = annotation_scores(annotation, pred)
    assert noisy["precision@0.5"] == 0.5 and noisy["f1@0.5"] == pytest.approx(2 / 3)
    assert noisy["aji"] == pytest.approx(12 / (16 + 4))


def test_pseudo_labels_fill_only_unannotated_pixels_and_come_back_for_the_graph():
    train_map = np.full((6, 6), -1, np.int32)
    train_map[0:2, 0:2] = 1  # a painted cell
    train_map[0:2, 2] = 0  # checked background
    teacher = np.zeros((6, 6), np.int32)
    teacher[0:2, 1:3] = 4  # overlaps the annotation: dropped
    teacher[4:6, 4:6] = 2  # wholly unannotated: kept
    kept = pseudo_instances(teacher, train_map)
    assert set(np.unique(kept)) == {0, 2}
    composite = with_pseudo_labels(train_map, kept)
    assert (composite[train_map >= 0] == train_map[train_map >= 0]).all() and (composite < 0).sum() == (train_map < 0).sum()
    graph = graph_labels(composite)
    assert (graph[0:2, 0:2] == 1).all() and (graph[4:6, 4:6] == 3).all()  # pseudo id shifted past the annotated ids
    assert set(np.unique(graph)) == {0, 1, 3}


def test_annotated_window_grows_to_the_crop_inside_the_image():
    train_map = np.full((100, 120), -1, np.int32)
    train_map[90:95, 2:6] = 0
    rows, cols = annotated_window(train_map, 64)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (36, 100, 0, 64)


def test_rgb_brightfield_images_follow_the_input_rules(tiny):
    image, labels = cells_image()
    rgb = np.stack([255 - 200 * (labels > 0)] * 3, axis=-1).astype(np.uint8)  # dark nuclei on a bright background
    plan = plan_finetune([AnnotatedImage("rgb", rgb, labels)], FinetuneSettings(diameter=10.0, invert=True), *tiny)
    np.testing.assert_allclose(plan.train[0].image, prepare_image(rgb, invert=True))
    assert plan.train[0].image[labels > 0].mean() > plan.train[0].image[labels == 0].mean()  # nuclei bright after inversion
