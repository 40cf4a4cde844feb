"""Write ``src/napari_graphkd/splits/checksums.tsv`` from a data folder laid out by ``graphkd data``.

Run by a maintainer when a dataset joins the layout:
``python scripts/data_manifest.py DATA`` (DATA holds bbbc039/, dsb2018_fluo/, dsb2018_brightfield/).
"""
import argparse
import os
import tempfile
from pathlib import Path

from napari_graphkd.io.datasets import DATASETS, MANIFEST, manifest_rows


def main() -> int:
    """Hash every image/labels pair under DATA and replace the manifest atomically."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    args = parser.parse_args()
    rows = manifest_rows(args.data, DATASETS)
    fd, tmp = tempfile.mkstemp(dir=MANIFEST.parent, suffix=".tsv")
    with os.fdopen(fd, "w") as out:
        out.write("dataset\tstem\timage_sha256\tlabels_sha256\n" + "".join(r + "\n" for r in rows))
    os.chmod(tmp, 0o644)
    os.replace(tmp, MANIFEST)
    print(f"{len(rows)} rows -> {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
