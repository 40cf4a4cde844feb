"""Split the DSB2018 fluorescence folder into train / tune / val by acquisition (deterministic).

Usage: python scripts/make_splits.py DSB_FOLDER [--out src/napari_graphkd/splits]

Rule (also stated in splits/README.md):
1. Per image: height, width, background median, nucleus median intensity (from the labels) and
   median nucleus diameter; standardised logs of these five numbers are clustered with Ward
   linkage. The tree cut at 12 clusters gives acquisition *types*, cut at 60 it gives acquisition
   *groups* (nested in the types). Images whose content overlaps (phase correlation, >= 10 % of
   the field, NCC >= 0.99) join one group.
2. Val holds whole types that never enter training: every type whose image size is not one of
   the two common sizes (256x256, 520x696), and the 256x256 type with the largest nuclei.
3. The groups of every other type go whole to train / tune / val: visited in a seeded random
   order, each goes to the split furthest below its share (relative to its target), the targets
   making the overall shares about 70 / 10 / 20 % of the images.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import tifffile
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

N_TYPES, N_GROUPS, SEED = 12, 60, 0
SHARES = {"train": 0.7, "tune": 0.1, "val": 0.2}
COMMON_SIZES = {(256, 256), (520, 696)}


def image_features(image: np.ndarray, labels: np.ndarray) -> list[float]:
    """Height, width, background median, nucleus median intensity, median nucleus diameter (px)."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    diameter = 2 * np.sqrt(np.median(areas) / np.pi) if len(areas) else 1.0
    fg = labels > 0
    background = float(np.median(image[~fg])) if (~fg).any() else 0.0
    nuclei = float(np.median(image[fg])) if fg.any() else background
    return [*image.shape, background, nuclei, float(diameter)]


def overlap_pairs(images: list[np.ndarray], min_overlap: float = 0.1, min_ncc: float = 0.99) -> list[tuple[int, int]]:
    """Index pairs of same-size images showing the same pixels at some shift (tiles of one field)."""
    pairs = []
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(im.shape, []).append(i)
    for (h, w), idx in by_shape.items():
        spectra = {i: np.fft.rfft2((images[i] - images[i].mean()) / (images[i].std() + 1e-6), (2 * h, 2 * w)) for i in idx}
        for k, a in enumerate(idx):
            for b in idx[k + 1 :]:
                cc = np.fft.irfft2(spectra[a] * np.conj(spectra[b]), (2 * h, 2 * w))
                dy, dx = np.unravel_index(int(np.argmax(cc)), cc.shape)
                dy, dx = (dy - 2 * h if dy > h else dy), (dx - 2 * w if dx > w else dx)
                pa = images[a][max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
                pb = images[b][max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)]
                if pa.size >= min_overlap * h * w and pa.std() > 0 and pb.std() > 0:
                    if np.corrcoef(pa.ravel(), pb.ravel())[0, 1] >= min_ncc:
                        pairs.append((a, b))
    return pairs


def split_dsb(folder: Path) -> tuple[dict[str, list[str]], dict]:
    """Stems per split and a summary (types, groups, counts)."""
    paths = sorted((folder / "images").glob("*.tif"))
    stems = [p.stem for p in paths]
    images = [tifffile.imread(p).astype(np.float32) for p in paths]
    labels = [tifffile.imread(folder / "labels" / p.name) for p in paths]
    feats = np.array([image_features(im, lab) for im, lab in zip(images, labels)])
    x = np.log1p(feats)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    tree = linkage(x, "ward")
    types = fcluster(tree, N_TYPES, "maxclust")
    groups = fcluster(tree, N_GROUPS, "maxclust")
    pairs = overlap_pairs(images)
    n = len(stems)
    edges = [(i, j) for i, j in pairs] + [(i, int(np.flatnonzero(groups == groups[i])[0])) for i in range(n)]
    rows, cols = zip(*edges)
    _, groups = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)

    sizes = [tuple(int(v) for v in f[:2]) for f in feats]
    type_ids = sorted(set(types))
    held_out = {t for t in type_ids if Counter(sizes[i] for i in np.flatnonzero(types == t)).most_common(1)[0][0] not in COMMON_SIZES}
    square = [t for t in type_ids if t not in held_out and sizes[np.flatnonzero(types == t)[0]] == (256, 256)]
    held_out.add(max(square, key=lambda t: np.median(feats[types == t, 4])))

    assign: dict[int, str] = {i: "val" for i in range(n) if types[i] in held_out}
    n_seen = n - len(assign)
    share = {"train": SHARES["train"] * n / n_seen, "tune": SHARES["tune"] * n / n_seen}
    share["val"] = 1.0 - share["train"] - share["tune"]
    target = {s: share[s] * n_seen for s in share}
    count = dict.fromkeys(share, 0)
    seen_groups = sorted({int(groups[i]) for i in range(n) if i not in assign})
    for g in np.random.default_rng(SEED).permutation(seen_groups):
        idx = [i for i in np.flatnonzero(groups == g) if i not in assign]
        split = max(("tune", "val", "train"), key=lambda s: (target[s] - count[s] - len(idx) / 2) / target[s])
        count[split] += len(idx)
        assign.update({i: split for i in idx})
    result = {s: sorted(stems[i] for i in range(n) if assign[i] == s) for s in ("train", "tune", "val")}
    summary = {
        "types": len(type_ids),
        "groups": int(len(set(groups))),
        "overlap_pairs": len(pairs),
        "held_out_types": [
            {"images": int((types == t).sum()), "size": Counter(sizes[i] for i in np.flatnonzero(types == t)).most_common(1)[0][0],
             "median_diameter": float(np.median(feats[types == t, 4]))}
            for t in sorted(held_out)
        ],
        "per_type": [
            {"images": int((types == t).sum()), "size": Counter(sizes[i] for i in np.flatnonzero(types == t)).most_common(1)[0][0],
             "median_diameter": round(float(np.median(feats[types == t, 4])), 1),
             **{s: int(sum(assign[i] == s for i in np.flatnonzero(types == t))) for s in ("train", "tune", "val")}}
            for t in type_ids
        ],
    }
    return result, summary


def main() -> None:
    """Write dsb2018_fluo_{train,tune,val}.txt and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="DSB2018 fluorescence folder with images/ and labels/")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/napari_graphkd/splits")
    args = parser.parse_args()
    splits, summary = split_dsb(args.folder)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, stems in splits.items():
        (args.out / f"dsb2018_fluo_{name}.txt").write_text("\n".join(stems) + "\n")
    print({k: len(v) for k, v in splits.items()})
    print(f"{summary['types']} types, {summary['groups']} groups, {summary['overlap_pairs']} overlapping pairs")
    print(f"{'images':>6} {'size':>10} {'diam':>5} {'train':>5} {'tune':>5} {'val':>5}")
    for row in summary["per_type"]:
        print(f"{row['images']:>6} {str(row['size']):>10} {row['median_diameter']:>5} {row['train']:>5} {row['tune']:>5} {row['val']:>5}")


if __name__ == "__main__":
    main()
