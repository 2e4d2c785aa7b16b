"""Synthetic fg/bg/mask/depth dataset made the way the source one was, packed with ShardWriter.

Backgrounds are square crops of real photographs bundled with scikit-image; foregrounds are
textured alpha shapes pasted (maybe flipped) at random positions; the mask is the alpha; depth is
a ground-plane ramp (far at the top) with each foreground standing on it, nearer than its foot.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from multiprocessing import get_context
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from storage import codec

log = logging.getLogger(__name__)

# Photographs shipped inside the scikit-image wheel (read straight from its data folder, so
# nothing goes through pooch or the network). Gray ones become RGB. The order fixes bg_index.
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "coins.png",
    "moon.png",
    "clock_motion.png",
    "hubble_deep_field.jpg",
)
# Crop 0 of each photo is the centre square (as the source did); the others are seeded random
# squares of CROP_SCALE of the short side.
CROPS_PER_PHOTO = 4
CROP_SCALE = (0.55, 0.9)
NUM_BACKGROUNDS = len(PHOTOS) * CROPS_PER_PHOTO
# Background crops and ramps do not depend on the dataset seed: bg_index names the same
# picture and the same ground plane in every dataset.
BACKGROUND_SEED = 6_192_020

# Ground-plane depth (0 = nearest, 1 = farthest): bottom row at NEAR, top row at FAR, curved by
# GAMMA, plus a left-right TILT (depth units across the full width).
NEAR_RANGE = (0.10, 0.35)
FAR_RANGE = (0.70, 0.95)
GAMMA_RANGE = (0.8, 1.6)
TILT_RANGE = (-0.05, 0.05)
# A foreground's depth is this much nearer than the ground under its foot...
FG_MARGIN_RANGE = (0.02, 0.08)
# ...and up to this much nearer again towards its middle (objects are a little rounded).
FG_BULGE_MAX = 0.015

# Longest side of a foreground, as a fraction of the image side.
FG_SIZE_RANGE = (0.2, 0.5)
MIN_FG_PX = 6
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased alpha edges
FG_SHAPES = ("ellipse", "rectangle", "polygon", "star", "blob", "person", "quadruped", "horse")
PHOTO_TEXTURE_P = 0.5  # else colour + smooth noise
FLIP_P = 0.5

# Below this many samples a process pool costs more to start than it saves.
MIN_SAMPLES_PER_POOL = 512
CHUNK_SAMPLES = 64
CHUNKS_IN_FLIGHT_PER_WORKER = 4

ProgressFn = Callable[[int], None]


# -- photos and backgrounds (per process, cached) --------------------------------------------------


def _data_dir() -> str:
    import skimage.data

    return os.path.dirname(skimage.data.__file__)


@functools.cache
def _photo(i: int) -> np.ndarray:
    path = os.path.join(_data_dir(), PHOTOS[i])
    if not os.path.exists(path):
        raise RuntimeError(f"{path}: scikit-image's bundled photo is missing; synth needs scikit-image>=0.24 as "
                           "installed from its wheel")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _resize_rgb(rgb: np.ndarray, w: int, h: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((w, h), resample))


@functools.lru_cache(maxsize=4)
def backgrounds(size: int) -> np.ndarray:
    """(NUM_BACKGROUNDS, size, size, 3) uint8: CROPS_PER_PHOTO square crops of each photo."""
    out = np.empty((NUM_BACKGROUNDS, size, size, 3), np.uint8)
    for p in range(len(PHOTOS)):
        photo = _photo(p)
        ph, pw = photo.shape[:2]
        short = min(ph, pw)
        for c in range(CROPS_PER_PHOTO):
            if c == 0:
                side, top, left = short, (ph - short) // 2, (pw - short) // 2
            else:
                rng = np.random.default_rng([BACKGROUND_SEED, p, c])
                side = int(short * rng.uniform(*CROP_SCALE))
                top = int(rng.integers(0, ph - side + 1))
                left = int(rng.integers(0, pw - side + 1))
            crop = np.ascontiguousarray(photo[top : top + side, left : left + side])
            out[p * CROPS_PER_PHOTO + c] = _resize_rgb(crop, size, size, Image.Resampling.LANCZOS)
    out.setflags(write=False)
    return out


def ground_ramp(bg_index: int, height: int, width: int) -> np.ndarray:
    """The background depth of background `bg_index`: HxW float32, increasing towards the top."""
    rng = np.random.default_rng([BACKGROUND_SEED, 1_000_000 + int(bg_index)])
    near, far = rng.uniform(*NEAR_RANGE), rng.uniform(*FAR_RANGE)
    gamma, tilt = rng.uniform(*GAMMA_RANGE), rng.uniform(*TILT_RANGE)
    up = 1.0 - np.arange(height, dtype=np.float64) / max(height - 1, 1)  # 1 at the top row
    across = np.arange(width, dtype=np.float64) / max(width - 1, 1) - 0.5
    ramp = near + (far - near) * up[:, None] ** gamma + tilt * across[None, :]
    return np.clip(ramp, 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _ramps(size: int) -> np.ndarray:
    out = np.stack([ground_ramp(b, size, size) for b in range(NUM_BACKGROUNDS)])
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=4)
def _encoded_backgrounds(size: int) -> tuple[bytes, ...]:
    # The same background JPEG serves every sample drawn on it; encoding is deterministic.
    return tuple(codec.encode_jpeg(bg) for bg in backgrounds(size))


def background_photo(bg_index: int) -> str:
    """File name (in scikit-image's data folder) of the photo background `bg_index` is cut from."""
    return PHOTOS[int(bg_index) // CROPS_PER_PHOTO]


# -- foreground shapes ------------------------------------------------------------------------------


def _fit(points: np.ndarray, w: int, h: int) -> list[tuple[float, float]]:
    """Scale polygon points so their bounding box fills the (supersampled) w x h canvas."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    scaled = (points - lo) / span * np.array([w * SUPERSAMPLE - 1, h * SUPERSAMPLE - 1])
    return [(float(x), float(y)) for x, y in scaled]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _radial(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _polygon_points(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        pts = np.stack([np.cos(t), rng.uniform(0.4, 1.0) * np.sin(t)], axis=1)
    elif kind == "rectangle":
        a = rng.uniform(0.3, 1.0)
        pts = np.array([[-1, -a], [1, -a], [1, a], [-1, a]], dtype=np.float64)
    elif kind == "polygon":
        n = int(rng.integers(5, 10))
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        pts = _radial(rng.uniform(0.45, 1.0, n), t)
    elif kind == "star":
        n = int(rng.integers(5, 9))
        t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.35, 0.6))
        pts = _radial(r, t)
    elif kind == "blob":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = np.ones_like(t)
        for k in range(2, 6):
            r += rng.uniform(0, 0.35 / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        pts = _radial(r, t)
    else:
        raise ValueError(kind)
    return _rotate(pts, rng.uniform(0, np.pi))


def _draw_person(d: ImageDraw.ImageDraw, W: float, H: float, rng: np.random.Generator) -> None:
    """A standing figure in a W x H box: head, torso, arms, legs."""
    cx = W / 2
    head_r = 0.09 * H
    d.ellipse([cx - head_r * 0.85, 0, cx + head_r * 0.85, 2 * head_r], fill=255)
    neck = 2 * head_r
    shoulder, hip = 0.18 * W + 0.22 * W, 0.55 * H
    d.polygon([(cx - shoulder, neck + 0.02 * H), (cx + shoulder, neck + 0.02 * H), (cx + 0.3 * W, hip),
               (cx - 0.3 * W, hip)], fill=255)
    limb = max(0.09 * W, 1.0)
    spread = rng.uniform(0.05, 0.35) * W
    for side in (-1, 1):
        d.line([(cx + side * 0.15 * W, hip - 0.02 * H), (cx + side * (0.1 * W + spread), H - limb / 2)], fill=255,
               width=int(limb * 1.6))
        hand_x = cx + side * rng.uniform(0.35, 0.5) * W
        d.line([(cx + side * (shoulder - limb), neck + 0.05 * H), (hand_x, rng.uniform(0.35, 0.6) * H)], fill=255,
               width=int(limb))


def _draw_quadruped(d: ImageDraw.ImageDraw, W: float, H: float, rng: np.random.Generator) -> None:
    """A four-legged animal in a W x H box facing right: body, legs, neck and head, tail."""
    body_top, body_bot = 0.25 * H, 0.62 * H
    d.ellipse([0.12 * W, body_top, 0.8 * W, body_bot], fill=255)
    leg_w = max(int(0.07 * W), 1)
    for x in (0.2, 0.3, 0.62, 0.72):
        x_foot = (x + rng.uniform(-0.04, 0.04)) * W
        d.line([(x * W, 0.5 * H), (x_foot, H - leg_w / 2)], fill=255, width=leg_w)
    head_y = rng.uniform(0.0, 0.2) * H
    d.line([(0.7 * W, 0.4 * H), (0.86 * W, head_y + 0.12 * H)], fill=255, width=int(0.12 * W))
    d.ellipse([0.78 * W, head_y, W - 1, head_y + 0.26 * H], fill=255)
    d.line([(0.14 * W, 0.35 * H), (0.0, rng.uniform(0.2, 0.6) * H)], fill=255, width=max(int(0.03 * W), 1))


@functools.lru_cache(maxsize=1)
def _horse_silhouette() -> Image.Image:
    with Image.open(os.path.join(_data_dir(), "horse.png")) as img:
        inside = np.asarray(img.convert("L")) < 128
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    inside = inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return Image.fromarray(inside.astype(np.uint8) * 255)


def _shape_alpha(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """h x w uint8 alpha of one shape, anti-aliased, cropped to its tight bounding box."""
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    if kind == "horse":
        canvas = _horse_silhouette().resize((W, H), Image.Resampling.BILINEAR)
    else:
        canvas = Image.new("L", (W, H), 0)
        d = ImageDraw.Draw(canvas)
        if kind == "person":
            _draw_person(d, W, H, rng)
        elif kind == "quadruped":
            _draw_quadruped(d, W, H, rng)
        else:
            d.polygon(_fit(_polygon_points(kind, rng), w, h), fill=255)
    alpha = np.asarray(canvas.resize((w, h), Image.Resampling.BOX))
    rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
    return np.ascontiguousarray(alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def _shape_box(kind: str, side: float, rng: np.random.Generator) -> tuple[int, int]:
    """(w, h) of the drawing box: the longest side is `side` pixels, the aspect suits the shape."""
    if kind == "person":
        h_over_w = rng.uniform(2.0, 2.8)
    elif kind == "quadruped":
        h_over_w = 1 / rng.uniform(1.3, 1.8)
    elif kind == "horse":
        h_over_w = _horse_silhouette().height / _horse_silhouette().width * rng.uniform(0.9, 1.1)
    else:
        h_over_w = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    if h_over_w >= 1:
        h, w = side, side / h_over_w
    else:
        w, h = side, side * h_over_w
    return max(int(round(w)), MIN_FG_PX), max(int(round(h)), MIN_FG_PX)


def _texture(w: int, h: int, bg_photo: int, rng: np.random.Generator) -> np.ndarray:
    """h x w x 3 uint8 foreground texture: a crop of another photo, or colour + smooth noise."""
    if rng.random() < PHOTO_TEXTURE_P:
        p = int(rng.integers(0, len(PHOTOS) - 1))
        p += p >= bg_photo  # never the background's own photo
        photo = _photo(p)
        ph, pw = photo.shape[:2]
        scale = rng.uniform(0.25, 0.7) * min(ph, pw) / max(w, h)
        cw, ch = max(int(w * scale), 1), max(int(h * scale), 1)
        top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        return _resize_rgb(np.ascontiguousarray(photo[top : top + ch, left : left + cw]), w, h)
    base = rng.uniform(40, 230, 3)
    grid = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0 - 0.5
    shade = np.linspace(1.1, 0.8, h, dtype=np.float32)[:, None, None]  # lit from above
    tex = base * shade * (1.0 + 0.6 * smooth) + rng.normal(0.0, 6.0, (h, w, 3))
    return np.clip(np.rint(tex), 0, 255).astype(np.uint8)


# -- one sample -------------------------------------------------------------------------------------


def make_sample(seed: int, sample_id: int, image_size: int) -> dict[str, Any]:
    """Sample `sample_id` of the dataset for `seed`, as raw arrays plus its label info.

    Keys: fg_bg, bg (HxWx3 uint8), mask (HxW uint8 0/255), depth (HxW float32 in [0, 1]),
    alpha (the pasted alpha, fg_h x fg_w uint8), bg_index, flipped, fg_x, fg_y, fg_w, fg_h, fg_shape.
    """
    rng = np.random.default_rng([int(seed), int(sample_id)])
    size = int(image_size)
    bg_index = int(rng.integers(0, NUM_BACKGROUNDS))
    bg = backgrounds(size)[bg_index]
    ramp = _ramps(size)[bg_index]

    kind = FG_SHAPES[int(rng.integers(0, len(FG_SHAPES)))]
    side = min(max(rng.uniform(*FG_SIZE_RANGE) * size, MIN_FG_PX), size)
    w, h = _shape_box(kind, side, rng)
    alpha = _shape_alpha(kind, w, h, rng)
    fg_h, fg_w = alpha.shape
    tex = _texture(fg_w, fg_h, bg_index // CROPS_PER_PHOTO, rng)
    flipped = bool(rng.random() < FLIP_P)
    if flipped:
        alpha, tex = alpha[:, ::-1], tex[:, ::-1]
    fg_x = int(rng.integers(0, size - fg_w + 1))
    fg_y = int(rng.integers(0, size - fg_h + 1))

    box = (slice(fg_y, fg_y + fg_h), slice(fg_x, fg_x + fg_w))
    a = alpha.astype(np.float32)[..., None] / 255.0
    fg_bg = bg.copy()
    fg_bg[box] = np.rint(bg[box] * (1.0 - a) + tex * a).astype(np.uint8)

    # Like the source: any alpha above zero is foreground.
    inside = alpha > 0
    mask = np.zeros((size, size), np.uint8)
    mask[box][inside] = 255

    # The foreground stands on the ground at its lowest row, nearer than the ground there.
    foot_cols = fg_x + np.nonzero(inside[-1])[0]
    foot_depth = float(ramp[fg_y + fg_h - 1, foot_cols].min())
    margin = rng.uniform(*FG_MARGIN_RANGE)
    bulge = rng.uniform(0.0, FG_BULGE_MAX)
    radius = max(1.0, 0.2 * min(fg_w, fg_h))
    roundness = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(radius)),
                           np.float32) / 255.0
    fg_depth = np.clip(foot_depth - margin - bulge * roundness, 0.0, 1.0)
    depth = ramp.copy()
    depth[box][inside] = fg_depth[inside]

    return {
        "fg_bg": fg_bg,
        "bg": bg,
        "mask": mask,
        "depth": depth,
        "alpha": np.ascontiguousarray(alpha),
        "bg_index": bg_index,
        "flipped": flipped,
        "fg_x": fg_x,
        "fg_y": fg_y,
        "fg_w": fg_w,
        "fg_h": fg_h,
        "fg_shape": kind,
    }


def _encoded_sample(seed: int, sample_id: int, image_size: int) -> dict[str, Any]:
    s = make_sample(seed, sample_id, image_size)
    depth_u16 = codec.depth_to_uint16(s["depth"])
    return {
        "sample_id": int(sample_id),
        "fg_bg": codec.encode_jpeg(s["fg_bg"]),
        "bg": _encoded_backgrounds(image_size)[s["bg_index"]],
        "mask": codec.encode_mask(s["mask"]),
        "depth": codec.encode_depth_uint16(depth_u16),
        "height": image_size,
        "width": image_size,
        "depth_mean": float(depth_u16.mean()) / codec.DEPTH_U16_MAX,
        "bg_index": np.int32(s["bg_index"]),
        "flipped": np.bool_(s["flipped"]),
        "fg_x": np.int32(s["fg_x"]),
        "fg_y": np.int32(s["fg_y"]),
        "fg_w": np.int32(s["fg_w"]),
        "fg_h": np.int32(s["fg_h"]),
        "fg_shape": s["fg_shape"],
    }


def _encode_chunk(seed: int, start: int, stop: int, image_size: int) -> list[dict[str, Any]]:
    return [_encoded_sample(seed, i, image_size) for i in range(start, stop)]


def _chunks(samples: int) -> Iterator[tuple[int, int]]:
    for start in range(0, samples, CHUNK_SAMPLES):
        yield start, min(start + CHUNK_SAMPLES, samples)


def _encoded_samples(samples: int, seed: int, image_size: int, workers: int) -> Iterator[list[dict[str, Any]]]:
    """Chunks of encoded samples in sample-id order, made in-process or by a process pool."""
    return map_chunks(_encode_chunk, samples, workers, seed, image_size)


def map_chunks(fn: Callable[..., Any], samples: int, workers: int, seed: int, image_size: int) -> Iterator[Any]:
    """fn(seed, start, stop, image_size) over CHUNK_SAMPLES-sized id ranges, results in order,
    in-process or by a process pool (fn must be importable by name)."""
    chunks = list(_chunks(samples))
    done = 0
    if workers > 1 and samples >= MIN_SAMPLES_PER_POOL:
        try:
            for chunk in _pooled(fn, chunks, seed, image_size, workers):
                yield chunk
                done += 1
        except BrokenProcessPool as exc:
            # e.g. a __main__ that spawn cannot re-import (stdin, some notebooks): the output
            # does not depend on where samples are made, so finish here instead of failing.
            log.warning("synth: process pool failed (%s); continuing in this process", exc)
    for start, stop in chunks[done:]:
        yield fn(seed, start, stop, image_size)


def _pooled(fn: Callable[..., Any], chunks: list[tuple[int, int]], seed: int, image_size: int,
            workers: int) -> Iterator[Any]:
    # spawn, not fork: the caller may be a Ray worker or hold pyarrow/MLflow threads.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        todo = iter(chunks)
        window = workers * CHUNKS_IN_FLIGHT_PER_WORKER  # bounds memory: results wait in order
        pending: deque[Future] = deque(pool.submit(fn, seed, a, b, image_size) for a, b in islice(todo, window))
        while pending:
            chunk = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fn, seed, nxt[0], nxt[1], image_size))
            yield chunk


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def synthesize(
    dest: str,
    samples: int,
    seed: int = 0,
    image_size: int = 200,
    rows_per_shard: int = 4096,
    rows_per_group: int = 256,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    format: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a synthetic dataset of `samples` samples (ids 0..samples-1) to `dest`; return its manifest.

    `dest` must be empty or hold only files this tool writes (a killed synth's are fine), else
    storage.dest_check.ForeignDestError, unless `force`.

    The bytes depend only on (seed, sample id, image_size), not on `workers`. `progress(n)` is
    called after each chunk with the number of samples just written (an increment, so a rich
    progress bar's advance() fits). `format` is ShardWriter's: by default the current one (/5,
    each of the NUM_BACKGROUNDS backgrounds stored once); storage.shards.LEGACY_MASK_DEPTH_FORMAT
    writes /2 as before it (the same values, every row holding its background).
    """
    from storage.dest_check import check_dest
    from storage.shards import ShardWriter  # the pool's workers never need pyarrow

    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if image_size < 2 * MIN_FG_PX:
        raise ValueError(f"image_size must be >= {2 * MIN_FG_PX} px, got {image_size}")
    check_dest(dest, "data synth", force)
    workers = default_workers() if workers is None else max(1, int(workers))
    writer = ShardWriter(dest, rows_per_shard=rows_per_shard, rows_per_group=rows_per_group, format=format)
    with writer:
        for chunk in _encoded_samples(samples, seed, image_size, workers):
            writer.add_many(chunk)
            if progress is not None:
                progress(len(chunk))
        return writer.close(
            {
                "image_size": [image_size, image_size],
                "seed": seed,
                "source": "synth",
                "synth": {
                    "backgrounds": NUM_BACKGROUNDS,
                    "photos": list(PHOTOS),
                    "crops_per_photo": CROPS_PER_PHOTO,
                    "fg_shapes": list(FG_SHAPES),
                },
            }
        )
