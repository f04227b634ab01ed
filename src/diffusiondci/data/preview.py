"""Pictures of a patch dataset: a slide before/after colour normalisation and patches with masks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .. import LABEL_COLOURS as PACKAGE_LABEL_COLOURS  # noqa: E402
from .imageio import read_mask, read_rgb  # noqa: E402
from .patch_dataset import read_manifest  # noqa: E402

#: Paper Fig. 5 colours: blue background, green benign, yellow malignant.
LABEL_COLOURS = np.array(PACKAGE_LABEL_COLOURS, np.uint8)


def colour_mask(mask: np.ndarray) -> np.ndarray:
    return LABEL_COLOURS[np.clip(mask, 0, 2)]


def dataset_overview(dataset: str | Path, path: str | Path, n_patches: int = 6) -> Path:
    """One figure: the first slide's before/after thumbnail, then patches above their masks."""
    dataset, path = Path(dataset), Path(path)
    rows = [r for r in read_manifest(dataset) if r.get("labelled", "1") != "0"]  # unlabelled: no mask file
    # prefer patches that show both lesion classes
    rows = sorted(rows, key=lambda r: -min(float(r["frac_benign"]), float(r["frac_malignant"])))[:n_patches]
    thumbs = sorted((dataset / "thumbnails").glob("*_colornorm.png"))
    fig = plt.figure(figsize=(2.0 * max(n_patches, 4), 8.4))
    grid = fig.add_gridspec(3, n_patches, height_ratios=[2.2, 1, 1])
    if thumbs:
        ax = fig.add_subplot(grid[0, :])
        ax.imshow(read_rgb(thumbs[0]))
        ax.set_title(f"{thumbs[0].stem}: colour normalisation of acquisition tiles", fontsize=10)
        ax.axis("off")
    cmap = ListedColormap(LABEL_COLOURS / 255.0)
    for i, row in enumerate(rows):
        top, bottom = fig.add_subplot(grid[1, i]), fig.add_subplot(grid[2, i])
        top.imshow(read_rgb(dataset / "images" / f"{row['id']}.png"))
        bottom.imshow(read_mask(dataset / "masks" / f"{row['id']}.png"), cmap=cmap, vmin=0, vmax=2,
                      interpolation="nearest")
        top.set_title(row["id"], fontsize=7)
        top.axis("off")
        bottom.axis("off")
    fig.text(0.5, 0.01, "masks: blue background, green benign, yellow malignant", ha="center", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path
