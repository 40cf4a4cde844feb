"""``graphkd evaluate`` with float label images: whole-number floats are labels, others are refused (never truncated)."""
import json

import numpy as np
import pytest
import tifffile

from napari_graphkd.cli import main
from napari_graphkd.metrics import as_labels


@pytest.fixture()
def folders(tmp_path, crop):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    tifffile.imwrite(gt / "a.tif", crop[1])
    return gt, pred, crop[1]


def test_integral_float_labels_score_like_integers(folders, capsys):
    gt, pred, labels = folders
    tifffile.imwrite(pred / "a.tif", labels.astype(np.float32))
    assert main(["evaluate", "--gt", str(gt), "--pred", str(pred), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean"]["f1@0.5"] == 1.0


def test_non_integral_float_labels_are_refused_with_one_line(folders, capsys):
    gt, pred, labels = folders
    tifffile.imwrite(pred / "a.tif", labels.astype(np.float32) / max(1, labels.max()))  # e.g. ids scaled to [0, 1]
    assert main(["evaluate", "--gt", str(gt), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphkd evaluate: error: ") and "non-integral" in err and "a.tif" in err and "\n" not in err


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.5, 2.0**60])
def test_as_labels_refuses_values_that_are_not_whole_ids(bad):
    with pytest.raises(ValueError, match="non-integral"):
        as_labels(np.array([[0.0, 1.0], [2.0, bad]]))


def test_as_labels_keeps_integer_and_whole_float_ids():
    assert as_labels(np.array([[0, 3]], dtype=np.uint16)).tolist() == [[0, 3]]
    assert as_labels(np.array([[0.0, 7.0]], dtype=np.float64)).dtype == np.int64
