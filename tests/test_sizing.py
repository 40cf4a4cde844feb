"""Automatic nucleus size: the estimate follows real images rescaled, and so does the student's F1."""
import numpy as np
import pytest
from skimage.transform import rescale

from napari_graphkd.metrics import evaluate
from napari_graphkd.sample_data import SAMPLE_NAMES, load_sample
from napari_graphkd.segment import AS_TRAINED, load_segmenter, segment_any
from napari_graphkd.sizing import BOUNDS, MAX_PASSES, PROBE, START, estimate_diameter, typical_diameter

WINDOW = (slice(100, 420), slice(140, 556))  # 320 x 416 of each 520 x 696 sample: ~60-100 nuclei


def rescaled(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """A real image and its ground truth as if imaged at ``factor`` times the magnification."""
    if factor == 1.0:
        return image, labels
    img = rescale(image.astype(np.float32), factor, order=1, preserve_range=True, anti_aliasing=factor < 1)
    lab = rescale(labels, factor, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
    return img, lab


def test_typical_diameter_follows_the_scale(sample):
    _, labels = sample
    native = typical_diameter(labels)
    assert 26 < native < 33  # BBBC039 nuclei: ~600 px area
    for factor in (0.5, 2.0):
        assert typical_diameter(rescaled(labels, labels, factor)[1]) == pytest.approx(factor * native, rel=0.05)
    assert typical_diameter(np.zeros((32, 32), np.int32)) is None


def test_fragments_do_not_pull_the_estimate_down(sample):
    """Cutting a third of the nuclei into quarters leaves the area-weighted median where it was."""
    _, labels = sample
    cut = labels.copy()
    ys, xs = np.indices(labels.shape)
    shattered = (labels > 0) & (labels % 3 == 0)
    cut[shattered] = labels.max() + 1 + 4 * labels[shattered] + 2 * (ys[shattered] % 16 < 8) + (xs[shattered] % 16 < 8)
    assert typical_diameter(cut) == pytest.approx(typical_diameter(labels), rel=0.1)


def test_estimate_stops_when_consistent_and_clamps_to_bounds(sample):
    _, labels = sample
    native = typical_diameter(labels)
    calls = []

    def segment_at(d):  # a segmenter that finds the ground truth at any diameter
        calls.append(d)
        return labels

    est = estimate_diameter(segment_at, native, start=native)
    assert calls == [native] and est.diameter == native and est.result is labels and est.passes == [(native, native)]
    calls.clear()
    est = estimate_diameter(segment_at, 20.0)  # first guess START x 20 px, then the measured diameter agrees
    assert calls == [START * 20.0, native] and est.diameter == native
    calls.clear()
    est = estimate_diameter(segment_at, 28.0)  # measured within 15 % of the training diameter: no rescaling
    assert calls == [START * 28.0, 28.0] and est.diameter == 28.0
    est = estimate_diameter(lambda d: np.zeros((8, 8), np.int32), 28.0)  # nothing found: as trained (None)
    assert est.diameter is None and est.passes == [(START * 28.0, None), (28.0, None), (28.0, None)]
    huge = np.zeros((400, 400), np.int32)
    huge[50:350, 50:350] = 1  # one 338-px object: beyond 5x the training size
    est = estimate_diameter(lambda d: huge, 28.0)
    assert est.diameter == pytest.approx(BOUNDS[1] * 28.0) and len(est.passes) == 2


def test_objects_that_grow_with_the_rescaling_give_the_training_diameter(sample):
    """A segmenter whose objects are always 1.3x the diameter asked for has no fixed point: no size is claimed."""
    _, labels = sample
    native = typical_diameter(labels)
    est = estimate_diameter(lambda d: rescaled(labels, labels, 1.3 * (d or 28.0) / native)[1], 28.0)
    assert est.diameter is None and len(est.passes) == MAX_PASSES + 1 and est.passes[-1][0] == 28.0


def test_a_first_guess_that_blobs_follow_is_probed_and_left(sample):
    """Blobs that measure whatever the first guess is (a model blind to small nuclei at half scale, e.g. whole cells on
    bright-field) are not taken for nuclei: one pass below the first guess finds the nuclei, and the estimate goes on."""
    _, labels = sample
    native = typical_diameter(labels)

    def blind_at_half_scale(d):
        return rescaled(labels, labels, d / native)[1] if d >= 1.5 * 28.0 else labels

    est = estimate_diameter(blind_at_half_scale, 28.0)  # the probe (33.6 px) measures the nuclei (~30 px): taken
    assert est.diameter == pytest.approx(PROBE * START * 28.0) and est.result is labels and len(est.passes) == 2
    small = rescaled(labels, labels, 0.7)[1]
    est = estimate_diameter(lambda d: blind_at_half_scale(d) if d >= 1.5 * 28.0 else small, 28.0)
    assert est.diameter == pytest.approx(typical_diameter(small)) and len(est.passes) == 3  # nuclei below the probe
    twice = rescaled(labels, labels, 2.0)[1]  # real nuclei twice the training size measure the same at the probe
    est = estimate_diameter(lambda d: twice, 28.0)
    assert est.diameter == START * 28.0 and est.result is twice and len(est.passes) == 2


def test_nothing_at_the_first_guess_goes_on_from_the_training_diameter(sample):
    """Small nuclei can vanish at the coarse first guess: the estimate continues at the training diameter."""
    _, labels = sample
    small = rescaled(labels, labels, 0.6)[1]
    est = estimate_diameter(lambda d: np.zeros((8, 8), np.int32) if d > 40 else small, 28.0)
    assert est.diameter == pytest.approx(typical_diameter(small), rel=0.15) and est.passes[:2] == [
        (START * 28.0, None), (28.0, pytest.approx(typical_diameter(small)))]


@pytest.fixture(scope="module")
def student_scores():
    """Per-sample F1 of a bundled student with diameter auto, on windows of the three samples, per scale."""
    cache = {}

    def score(name, factor):
        if (name, factor) not in cache:
            student, rows = load_segmenter(name), []
            for sample_name in SAMPLE_NAMES:
                image, labels = load_sample(sample_name)
                img, lab = rescaled(image[WINDOW], labels[WINDOW], factor)
                result = segment_any(student, img)  # the defaults: every input rule automatic
                rows.append((evaluate(lab, result.labels)["f1@0.5"], result.inputs.diameter / typical_diameter(lab)))
            cache[name, factor] = np.array(rows)
        return cache[name, factor]

    return score


# The generalist student loses 0.030 F1 at 0.5x (0.899 vs 0.929 native; the target is within 0.03): it is less sharp
# than the BBBC039 student on nuclei of ~15 px upscaled 1.8x. Strict: the test fails once that is fixed.
MISSED = pytest.mark.xfail(strict=True, reason="student F1 at 0.5x is 0.0302 below native (target 0.03), issue #14")


@pytest.mark.parametrize("name, factor", [("student-bbbc039", f) for f in (0.5, 0.75, 1.5, 2.0)]
                         + [pytest.param("student", 0.5, marks=MISSED)] + [("student", f) for f in (0.75, 1.5, 2.0)])
def test_student_f1_holds_across_scales_with_automatic_diameter(student_scores, name, factor):
    """Real images rescaled 0.5x-2x: mean F1 within 0.03 of the native scale, estimate within 20 % of the truth."""
    native, scaled = student_scores(name, 1.0), student_scores(name, factor)
    assert native[:, 0].mean() > 0.9
    assert abs(scaled[:, 0].mean() - native[:, 0].mean()) <= 0.03, (scaled, native)
    assert np.all(np.abs(scaled[:, 1] - 1) <= 0.2), scaled


def test_nuclei_four_times_the_training_size_are_found_whole():
    """At the training size a 4x-magnified image shatters into nucleus-sized fragments; the coarse first pass finds the nuclei."""
    student = load_segmenter("student")
    image, labels = load_sample(SAMPLE_NAMES[2])
    img, lab = rescaled(image[:160, :200], labels[:160, :200], 4.0)
    auto = segment_any(student, img)
    as_trained = segment_any(student, img, **AS_TRAINED.kwargs())
    assert auto.inputs.diameter == pytest.approx(typical_diameter(lab), rel=0.15)
    assert evaluate(lab, auto.labels)["f1@0.5"] > 0.85 > 0.5 > evaluate(lab, as_trained.labels)["f1@0.5"]


def test_a_fine_tuned_checkpoint_starts_the_estimate_at_its_painted_diameter(tmp_path, tiny_checkpoint):
    """A fine-tuned checkpoint records its user's nucleus size: the first pass of the automatic diameter runs there
    (a start at START training diameters can merge touching nuclei into blobs that measure consistently)."""
    from napari_graphkd.io.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    tuned = save_checkpoint(tmp_path / "tuned.safetensors", model, dict(meta, finetune={"diameter": 21.5}))
    image = load_sample(SAMPLE_NAMES[0])[0][:128, :128]
    for path, first in ((tiny_checkpoint, None), (tuned, 21.5)):
        segmenter = load_segmenter(str(path))
        tried = []
        plain = segmenter.segment_plane

        def spy(plane, inputs, **kw):
            tried.append(inputs.diameter)
            return plain(plane, inputs, **kw)

        segmenter.segment_plane = spy
        segment_any(segmenter, image)
        assert tried[0] == pytest.approx(first if first else START * segmenter.train_diameter)
    assert segmenter.size_hint == 21.5 and load_segmenter("classical").size_hint is None
