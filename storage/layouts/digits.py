"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download) as an ImageFolder tree:

  DEST/0/0000.png ... DEST/9/1796.png     grayscale PNGs upsampled to size x size (bilinear)

A small real classification set for tests, acceptance runs and benchmarks:
`orchestrator data pack DEST PACKED --task classification` packs it into 10 classes ("0".."9").
Needs scikit-learn (not a dependency of the project; `pip install scikit-learn`).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from storage import fs as sfs

DIGITS_SAMPLES = 1797


def digits_images(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """(N x size x size uint8 images, N labels) of sklearn.datasets.load_digits, upsampled."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the digits set comes from scikit-learn, which is not installed: pip install "
                           "scikit-learn") from exc
    d = load_digits()
    src = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # values 0..16
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in src])
    return out, d.target.astype(np.int64)


def write_digits_imagefolder(dest: str, size: int = 28) -> dict[str, Any]:
    """Write the 1,797 digits to DEST/<digit>/<index>.png; returns {samples, classes, counts, uri}."""
    from storage.seed_layout import _FolderSink

    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    images, labels = digits_images(size)
    dest = sfs.normalize(dest)
    sink = _FolderSink(dest)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        sink.add(f"{int(label)}/{i:04d}.png", buf.getvalue())
    sink.close()
    counts = np.bincount(labels, minlength=10)
    return {"samples": int(len(labels)), "classes": [str(c) for c in range(10)], "counts": counts.tolist(), "uri": dest}
