"""Property-based tests (hypothesis): any input array gets labels of its shape or one InputError; metrics behave.

Input rules: every dtype, shape (2D, RGB/RGBA, multi-channel, channel-first, stacks), NaN/inf,
constant images, tiny and huge values, odd sizes. The answer is either one ``InputError`` with a
one-line message, or int32 labels >= 0 whose shape is the image's without the channel axis.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_graphkd.metrics import evaluate
from napari_graphkd.preprocess import InputError
from napari_graphkd.segment import load_segmenter, segment_any

DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64, np.bool_]
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BOUNDED = ("acc@0.5", "f1@0.5", "pq", "dq", "sq", "aji", "sbd")


@pytest.fixture(scope="module")
def student():
    return load_segmenter("student")


def shapes():
    """2D planes, (Y,X,C) with C in 1..5, channel-first (C,Y,X) and small (Z,Y,X) stacks; sides mostly 16..40."""
    side = st.one_of(st.integers(16, 40), st.integers(1, 40))
    return st.one_of(
        st.tuples(side, side),
        st.tuples(side, side, st.integers(1, 5)),
        st.tuples(st.integers(1, 4), side, side),
        st.tuples(st.integers(1, 2), side, side, st.sampled_from([1, 3])),
    )


@st.composite
def images(draw):
    """An array of any listed dtype and shape: random, constant, with NaN/inf, tiny or huge values."""
    dtype, shape = np.dtype(draw(st.sampled_from(DTYPES))), draw(shapes())
    kind = draw(st.sampled_from(["random", "constant", "extreme"]))
    if kind == "constant":
        value = draw(st.sampled_from([0, 1, 255]))
        return np.full(shape, value).astype(dtype)
    if dtype.kind == "f":
        big = float(np.asarray(min(1e30, float(np.finfo(dtype).max)), dtype))  # exactly representable in dtype
        elements = st.floats(-big, big, width=dtype.itemsize * 8, allow_subnormal=False)
        if kind == "extreme":
            elements = st.sampled_from([np.nan, np.inf, -np.inf, 1e-30, 1e30, 0.0, 1.0]).map(lambda v: float(np.array(v, dtype)))
        return draw(arrays(dtype, shape, elements=elements))
    return draw(arrays(dtype, shape))


def labels_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Expected label shape: the image's without a last channel axis (<= 8 long, after at least a plane)."""
    return shape[:-1] if len(shape) >= 3 and shape[-1] <= 8 else shape


@FEW
@given(image=images())
def test_any_input_gives_labels_of_its_shape_or_one_input_error(student, image):
    try:
        result = segment_any(student, image)
    except InputError as exc:
        message = str(exc)
        assert message and "\n" not in message
        event("refused")
        return
    event("segmented")
    labels = result.labels
    assert labels.shape == labels_shape(image.shape) and labels.dtype == np.int32 and labels.min(initial=0) >= 0


@FEW
@given(image=images())
def test_nan_and_inf_are_always_refused(student, image):
    if image.dtype.kind != "f" or np.isfinite(image).all():
        return
    with pytest.raises(InputError):
        segment_any(student, image)


def label_images(shape=(12, 14)):
    """Small label images with ids up to 6 (0 = background)."""
    return arrays(np.int32, shape, elements=st.integers(0, 6))


@settings(max_examples=60, deadline=None)
@given(gt=label_images(), pred=label_images())
def test_metrics_are_bounded_and_symmetric_where_they_should_be(gt, pred):
    ab, ba = evaluate(gt, pred), evaluate(pred, gt)
    for key in BOUNDED:
        assert 0.0 <= ab[key] <= 1.0, key
    for key in ("acc@0.5", "f1@0.5", "pq", "dq", "sq", "sbd"):
        assert ab[key] == pytest.approx(ba[key]), key
    assert ab["n_gt"] == ba["n_pred"] and ab["abs_dic"] == ba["abs_dic"]


@settings(max_examples=60, deadline=None)
@given(gt=label_images(), pred=label_images(), seed=st.integers(0, 2**16))
def test_metrics_ignore_which_ids_label_the_objects(gt, pred, seed):
    rng = np.random.default_rng(seed)
    new_ids = np.r_[0, rng.permutation(np.arange(1, 7)) + rng.integers(0, 1000)]  # background stays 0
    assert evaluate(new_ids[gt], new_ids[pred]) == pytest.approx(evaluate(gt, pred))


@settings(max_examples=40, deadline=None)
@given(labels=label_images())
def test_perfect_and_empty_cases(labels):
    empty = np.zeros_like(labels)
    same = evaluate(labels, labels)
    assert all(same[k] == 1.0 for k in BOUNDED)
    both_empty = evaluate(empty, empty)
    assert all(both_empty[k] == 1.0 for k in BOUNDED) and both_empty["abs_dic"] == 0
    if labels.any():
        for missing in (evaluate(labels, empty), evaluate(empty, labels)):
            assert all(missing[k] == 0.0 for k in BOUNDED)
