"""A synthetic keypoints dataset: a bright blob on a noisy background; the target is a Gaussian heatmap
around its centre. Each sample depends only on (seed, sample id, image size), as storage.synth_tasks'
generators do, so `data.synthesize` makes the same bytes on every machine."""

from __future__ import annotations

from typing import Any

import numpy as np

from storage import codec

SIGMA_PX = 2.0


def make_keypoint(seed: int, sample_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(seed), int(sample_id), 97])
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 10) ** 2))
    colour = rng.uniform(0.5, 1.0, size=3)
    img = 0.25 * rng.random((size, size, 3)) + blob[..., None] * colour
    heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * SIGMA_PX**2))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), np.rint(heat * 255).astype(np.uint8)


def keypoints_chunk(seed: int, start: int, stop: int, image_size: int) -> list[dict[str, Any]]:
    out = []
    for i in range(start, stop):
        img, heat = make_keypoint(seed, i, image_size)
        # The image as JPEG bytes; the heatmap as an array, which storage encodes by its column's codec.
        out.append({"sample_id": i, "image": codec.encode_jpeg(img), "heatmap": heat,
                    "height": image_size, "width": image_size})
    return out
