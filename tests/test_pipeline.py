"""One segmentation pipeline: every caller (CLI, widget job, scoring, stacks) gets the same labels on the bundled samples."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch

from napari_graphkd.cli import main
from napari_graphkd.data import Sample
from napari_graphkd.decode.policy import decode_output
from napari_graphkd.evaluation import network_outputs
from napari_graphkd.inference import working_image
from napari_graphkd.preprocess import InputError
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.planes import plane_layout
from napari_graphkd.segment import ClassicalSegmenter, Stopped, count_objects, decide_inputs, load_segmenter, segment_any

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def samples():
    """Crops (256x352, a quarter of the pixels) of the bundled sample images."""
    return [load_sample(name)[0][:256, :352] for name in SAMPLE_NAMES]


@pytest.fixture(scope="module")
def student():
    return load_segmenter("student")


@pytest.fixture(scope="module")
def labels(student, samples):
    """The pipeline's student labels of each bundled sample."""
    return [segment_any(student, image).labels for image in samples]


def test_cli_scoring_and_stacks_give_the_pipeline_labels(student, samples, labels, tmp_path):
    for i, image in enumerate(samples):
        tifffile.imwrite(tmp_path / f"s{i}.tif", image)
    assert main(["segment", "--model", "student", "--out", str(tmp_path / "out"), *(str(tmp_path / f"s{i}.tif") for i in range(3))]) == 0
    for i, expected in enumerate(labels):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / f"s{i}.tif"), expected)
    as_trained = [segment_any(student, image, diameter=None, invert=False, channel="luminance").labels for image in samples]
    prepared = [Sample(str(i), working_image(image), expected) for i, (image, expected) in enumerate(zip(samples, as_trained))]
    for output, expected in zip(network_outputs(student.model, prepared), as_trained):  # evaluation and fine-tune scoring
        np.testing.assert_array_equal(decode_output(output, student.decode_settings)[0], expected)
    stack = segment_any(student, np.stack(samples))  # input rules decided once, on the first plane
    np.testing.assert_array_equal(stack.labels[0], labels[0])
    same_rules = [segment_any(student, image, **stack.inputs.run_settings().kwargs()).labels for image in samples]
    np.testing.assert_array_equal(stack.labels, np.stack(same_rules))
    assert stack.objects == sum(count_objects(x) for x in same_rules) > max(count_objects(x) for x in same_rules)


def test_widget_job_gives_the_pipeline_labels(samples, labels):
    from napari_graphkd._widgets._jobs import SegmentRequest, segment_job

    request = SegmentRequest("id", "sample", samples[0], (None,), (("student", "student"),))
    job, progress = segment_job(request, threading.Event()), []
    try:
        while True:
            progress.append(next(job))
    except StopIteration as stop:
        result = stop.value
    assert result.error is None and progress[-1] == 1.0 and progress == sorted(progress)
    np.testing.assert_array_equal(result.models[0].labels, labels[0])


def test_one_stack_rule_for_every_layout():
    assert plane_layout((64, 80)) == ((), (64, 80))
    assert plane_layout((64, 80, 3)) == ((), (64, 80, 3))  # RGB
    assert plane_layout((5, 64, 80)) == ((5,), (64, 80))  # Z stack, or channel-first planes
    assert plane_layout((2, 5, 64, 80)) == ((2, 5), (64, 80))  # time series of stacks
    assert plane_layout((2, 5, 64, 80, 4)) == ((2, 5), (64, 80, 4))
    with pytest.raises(InputError, match=r"shape \(2, 2, 2, 64, 80\)"):
        plane_layout((2, 2, 2, 64, 80))


def test_progress_per_tile_and_stop_between_tiles(student, samples):
    fractions = []
    segment_any(student, samples[0], tile=128, on_progress=fractions.append)
    assert len(fractions) > 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    with pytest.raises(Stopped):
        segment_any(student, samples[0], tile=128, should_stop=lambda: bool(fractions.append(0) or len(fractions) > 8))


def test_input_rules_are_recorded_in_the_result(samples):
    result = segment_any(ClassicalSegmenter(), samples[0], diameter=40.0, invert=False)
    assert result.inputs == decide_inputs(ClassicalSegmenter(), samples[0], 40.0, False)
    assert result.inputs.describe() == "40 px, not inverted, luminance (auto)"
    assert decide_inputs(ClassicalSegmenter(), samples[0], None, True).describe() == "as trained, inverted, luminance (auto)"
    auto = segment_any(ClassicalSegmenter(), samples[0])
    assert auto.inputs.describe().endswith("px (auto), not inverted (auto), luminance (auto)")


@pytest.mark.parametrize("diameter", [0, -10, float("nan"), float("inf"), "x"])
def test_bad_diameters_are_refused(diameter, samples):
    with pytest.raises(InputError, match="diameter"):
        segment_any(ClassicalSegmenter(), samples[0], diameter=diameter)


def test_a_diameter_that_would_blow_up_the_working_image_is_refused(student, samples):
    with pytest.raises(InputError, match="nucleus diameter 0.01 px would rescale each 256x352 plane"):
        segment_any(student, samples[0], diameter=0.01)


def test_a_time_series_is_segmented_and_its_errors_name_the_file_shape(samples):
    series = np.stack([np.stack(samples[:2])] * 2)  # (T, Z, Y, X)
    result = segment_any(ClassicalSegmenter(), series)
    assert result.labels.shape == series.shape
    np.testing.assert_array_equal(result.labels[1, 0], segment_any(ClassicalSegmenter(), samples[0]).labels)
    broken = series.astype(np.float32)
    broken[1, 0, 5, 5] = np.nan
    with pytest.raises(InputError, match=r"plane 1, 0 of the image of shape \(2, 2, 256, 352\): .*NaN"):
        segment_any(ClassicalSegmenter(), broken)
