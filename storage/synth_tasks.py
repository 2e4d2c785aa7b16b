"""Synthetic, learnable datasets for the task kinds beside mask_depth (storage/synth.py's).

- classification: 10 classes of glyphs (CLASSIFICATION_CLASSES; sample i is class i % 10), 28x28 grayscale
  PNGs, each drawn with its own size, position, rotation, stroke, contrast and noise; a small CNN learns them in a
  couple of CPU minutes, and chance is 10%.
- segmentation: 1-4 shapes of 5 classes (SEGMENTATION_CLASSES: 0 = background, then disc, square,
  triangle, cross, ring), each in a random colour at a random position, scale and rotation, pasted
  on crops of scikit-image's bundled photographs (synth.py's backgrounds); JPEG images, class-index
  masks with a thin 255 (ignore) band on anti-aliased edges, as Pascal VOC has.
- depth: rendered rooms with true z-depth in metres: a camera 1-1.7 m above a chequered floor that
  recedes to the horizon, a brick back wall at 4-9.5 m, sometimes side walls, and 1-4 boxes and
  spheres standing on the floor. Depth is inferable from the image: perspective (texture shrinks
  with distance, objects stand on the floor where it is at their depth), shading, and fog that
  darkens and greys far surfaces. Some samples have a blob of invalid (0) depth, as Kinect data does.
  Stored in millimetres (0.5-10 m).

Every sample depends only on (seed, sample id, image size); chunks are made in-process or by a
process pool like synth.py's. `layout="seed"` writes the raw layout `data pack --task KIND` takes.

What each task's dataset holds (columns, index extras, default and least image size) is its spec's
(common.tasks); the spec's `synth` names the chunk generator, so a task from outside the package
brings its own generator: `fn(seed, start, stop, image_size) -> [row, ...]`, each row a dict with
sample_id, height, width, the spec's columns and index extras.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.plugins import resolve_import_path
from common.task_spec import TaskSpec
from common.tasks import IGNORE_INDEX, MM_PER_M, get_task_spec
from storage import codec
from storage import fs as sfs

# Sorted by name: an ImageFolder tree of them (`--layout seed`) packs to the same class indices.
CLASSIFICATION_CLASSES = ("crescent", "cross", "diamond", "disc", "frame", "plus", "ring", "square", "star", "triangle")
SEGMENTATION_CLASSES = ("background", "disc", "square", "triangle", "cross", "ring")
SUPERSAMPLE = 4
# Per-task streams of the sample RNG (a task's sample i never shares draws with another task's).
_STREAM = {"classification": 11, "segmentation": 12, "depth": 13}

ProgressFn = Callable[[int], None]


def _rng(task: str, seed: int, sample_id: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(sample_id), _STREAM[task]])


def _regular(n: int, radius: float, angle: float, cx: float, cy: float, sx: float = 1.0) -> list[tuple[float, float]]:
    t = angle + np.arange(n) * 2 * np.pi / n
    return [(float(cx + sx * radius * math.cos(a)), float(cy + radius * math.sin(a))) for a in t]


def _bars(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, w: float, angle: float, fill: int) -> None:
    for a in (angle, angle + np.pi / 2):
        dx, dy = math.cos(a), math.sin(a)
        px, py = -dy * w / 2, dx * w / 2
        d.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                   (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fill)


def _star(cx: float, cy: float, r: float, angle: float, points: int = 5,
          inner: float = 0.45) -> list[tuple[float, float]]:
    t = angle + np.arange(2 * points) * np.pi / points
    rr = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return [(float(cx + a * math.cos(b)), float(cy + a * math.sin(b))) for a, b in zip(rr, t, strict=True)]


def draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, w: float,
               rng: np.random.Generator) -> None:
    """One shape of radius ~r centred at (cx, cy), filled with 255 on an L canvas (w: stroke width)."""
    if kind == "disc":
        a = r * rng.uniform(0.85, 1.15)
        d.ellipse([cx - a, cy - r, cx + a, cy + r], fill=255)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = max(r - w, r * 0.35)
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif kind == "square":
        d.polygon(_regular(4, r * 1.2, angle + np.pi / 4, cx, cy), fill=255)
    elif kind == "frame":
        d.polygon(_regular(4, r * 1.2, angle + np.pi / 4, cx, cy), fill=255)
        d.polygon(_regular(4, max(r * 1.2 - w * 1.4, r * 0.4), angle + np.pi / 4, cx, cy), fill=0)
    elif kind == "triangle":
        d.polygon(_regular(3, r * 1.15, angle - np.pi / 2, cx, cy), fill=255)
    elif kind == "diamond":
        d.polygon(_regular(4, r * 1.15, angle, cx, cy, sx=0.62), fill=255)
    elif kind == "plus":
        _bars(d, cx, cy, r, w * 1.2, angle, 255)
    elif kind == "cross":
        _bars(d, cx, cy, r, w * 1.2, angle + np.pi / 4, 255)
    elif kind == "star":
        d.polygon(_star(cx, cy, r * 1.1, angle - np.pi / 2), fill=255)
    elif kind == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = r * 0.55
        d.ellipse([cx - r + off * math.cos(angle), cy - r + off * math.sin(angle), cx + r + off * math.cos(angle),
                   cy + r + off * math.sin(angle)], fill=0)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _alpha(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None]) -> np.ndarray:
    """size x size float32 coverage in [0, 1] of what `draw(d, scale)` paints on a supersampled canvas."""
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw(ImageDraw.Draw(canvas), float(SUPERSAMPLE))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0


def _png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values)).save(buf, format="PNG", compress_level=codec.PNG_COMPRESS_LEVEL)
    return buf.getvalue()


# -- classification --------------------------------------------------------------------------------


def make_classification(seed: int, sample_id: int, size: int = 28) -> tuple[np.ndarray, int]:
    """(size x size uint8 gray image, class index) of one glyph."""
    rng = _rng("classification", seed, sample_id)
    # Balanced, and every class present from 10 samples on (so an ImageFolder tree of any synth
    # set has all 10 class folders and packs to the same class indices).
    label = int(sample_id) % len(CLASSIFICATION_CLASSES)
    kind = CLASSIFICATION_CLASSES[label]
    r = size * rng.uniform(0.24, 0.4)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    angle = rng.uniform(-0.35, 0.35)  # +-20 degrees: plus and cross, square and diamond stay apart
    w = r * rng.uniform(0.25, 0.4)
    alpha = _alpha(size, lambda d, s: draw_shape(d, kind, cx * s, cy * s, r * s, angle, w * s, rng))
    fg, bg = rng.uniform(150, 255), rng.uniform(0, 70)
    if rng.random() < 0.5:
        fg, bg = fg * rng.uniform(0.6, 1.0), bg  # dimmer strokes in half the samples
    img = bg + (fg - bg) * alpha + rng.normal(0.0, rng.uniform(6, 22), alpha.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


# -- segmentation ------------------------------------------------------------------------------------


def _class_colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    """An object's colour: its class's typical hue (as grass is green and sky blue), jittered in hue,
    saturation and brightness, so colour is a cue a small model picks up within minutes and shape
    the one that tells near hues apart."""
    import colorsys

    hue = (cls - 1) / (len(SEGMENTATION_CLASSES) - 1) + rng.normal(0.0, 0.04)
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
    return (np.asarray(rgb, dtype=np.float32) * 235.0 + 10.0).astype(np.float32)


def make_segmentation(seed: int, sample_id: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(HxWx3 uint8 image, HxW uint8 class map with 255 on anti-aliased edges, background index)."""
    from storage.synth import NUM_BACKGROUNDS, backgrounds

    rng = _rng("segmentation", seed, sample_id)
    bg_index = int(rng.integers(0, NUM_BACKGROUNDS))
    img = backgrounds(size)[bg_index].astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    ramp = np.linspace(1.15, 0.8, size, dtype=np.float32)[:, None, None]  # lit from above
    # One to three objects, each spanning a fifth to a half of the image as VOC's objects do, so
    # a stride-32 encoder at the CPU recipe's 64 px still sees each one in its coarsest map.
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, len(SEGMENTATION_CLASSES)))
        kind = SEGMENTATION_CLASSES[cls]
        r = size * rng.uniform(0.12, 0.25)
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        angle = rng.uniform(0, 2 * np.pi)
        w = r * rng.uniform(0.35, 0.5)
        a = _alpha(size,
                   lambda d, s, kind=kind, cx=cx, cy=cy, r=r, angle=angle, w=w: draw_shape(d, kind, cx * s, cy * s,
                                                                                           r * s, angle, w * s, rng))
        colour = _class_colour(cls, rng)
        tex = colour * ramp + rng.normal(0.0, 8.0, (size, size, 3)).astype(np.float32)
        img = img * (1 - a[..., None]) + tex * a[..., None]
        mask[a >= 0.75] = cls
        mask[(a > 0.25) & (a < 0.75)] = IGNORE_INDEX
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask, bg_index


# -- depth --------------------------------------------------------------------------------------------


def _fog(colour: np.ndarray, z: np.ndarray, k: float, fog: np.ndarray) -> np.ndarray:
    t = np.exp(-k * z)[..., None]
    return colour * t + fog * (1 - t)


def make_depth(seed: int, sample_id: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW float32 z-depth in metres, 0 = invalid) of one rendered room."""
    rng = _rng("depth", seed, sample_id)
    H = W = size
    f = W * rng.uniform(0.9, 1.2)
    u0, v0 = W / 2 + rng.uniform(-0.1, 0.1) * W, H * rng.uniform(0.3, 0.5)
    cam_h = rng.uniform(1.0, 1.7)
    wall = rng.uniform(4.0, 9.5)
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    dv = v - v0
    with np.errstate(divide="ignore"):
        z_floor = np.where(dv > 0, f * cam_h / np.maximum(dv, 1e-9), np.inf)
    z = np.minimum(z_floor, wall)
    surface = np.where(z_floor < wall, 0, 1)  # 0 floor, 1 back wall, 2 side wall, 3+ objects
    if rng.random() < 0.6:
        side_x = rng.uniform(1.5, 3.0)
        du = np.abs(u - u0)
        with np.errstate(divide="ignore"):
            z_side = np.where(du > 0, f * side_x / np.maximum(du, 1e-9), np.inf)
        side = z_side < z
        z = np.where(side, z_side, z)
        surface = np.where(side, 2, surface)

    # World coordinates of each pixel on its surface (x right, y up from the floor, z forward).
    X = (u - u0) * z / f
    Y = cam_h - dv * z / f
    light = rng.uniform(0.85, 1.15)
    floor_a, floor_b = rng.uniform(90, 200, 3), rng.uniform(30, 120, 3)
    tile = rng.uniform(0.4, 0.8)
    checker = ((np.floor(X / tile) + np.floor(z / tile)) % 2)[..., None]
    colour = np.where(checker > 0, floor_a, floor_b) * np.ones((H, W, 1))
    brick_h = rng.uniform(0.2, 0.35)
    row = np.floor(Y / brick_h)
    brick = (np.floor(X / (2 * brick_h) + 0.5 * (row % 2)) + row) % 2
    wall_rgb = rng.uniform(80, 200, 3)
    mortar = ((Y / brick_h) % 1 < 0.12)[..., None]
    wall_col = np.where(mortar, wall_rgb * 0.55, wall_rgb * (0.85 + 0.15 * brick[..., None]))
    colour = np.where((surface == 1)[..., None], wall_col, colour)
    panel = ((np.floor(z / 0.6) % 2)[..., None] * 0.2 + 0.7) * rng.uniform(70, 190, 3)
    colour = np.where((surface == 2)[..., None], panel, colour)

    ray = np.stack([(u - u0) / f, -dv / f, np.ones_like(u)], axis=-1)
    light_dir = np.array([-0.4, 0.8, -0.45])
    light_dir /= np.linalg.norm(light_dir)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        zc = rng.uniform(1.0, max(wall - 0.8, 1.6))
        half_w = 0.9 * (W / 2) * zc / f
        xc = rng.uniform(-half_w, half_w)
        objects.append((zc, xc))
    for zc, xc in sorted(objects, reverse=True):  # far to near: nearer ones cover
        col = rng.uniform(40, 240, 3)
        if rng.random() < 0.5:  # a sphere resting on the floor
            r = rng.uniform(0.2, 0.6)
            C = np.array([xc, -cam_h + r, zc])
            a = (ray * ray).sum(-1)
            b = ray @ C
            disc = b * b - a * (C @ C - r * r)
            hit = disc > 0
            t = np.where(hit, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
            hit &= (t < z) & (t > 0)
            n = (ray * np.where(hit, t, 0.0)[..., None] - C) / r
            shade = 0.35 + 0.65 * np.clip(n @ light_dir, 0, 1)
            z = np.where(hit, t, z)
            colour = np.where(hit[..., None], col * shade[..., None], colour)
        else:  # a box: its front face, facing the camera, standing on the floor
            bw, bh = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.3)
            inside = (np.abs((u - u0) * zc / f - xc) <= bw / 2) & (dv * zc / f <= cam_h) & (cam_h - dv * zc / f <= bh)
            hit = inside & (zc < z)
            z = np.where(hit, zc, z)
            stripes = 0.9 + 0.1 * (np.floor((cam_h - dv * zc / f) / 0.15) % 2)
            colour = np.where(hit[..., None], col * stripes[..., None], colour)
    shade = light / (1.0 + 0.06 * z)
    k = rng.uniform(0.04, 0.14)
    fog = np.full(3, rng.uniform(150, 220))
    img = _fog(colour * shade[..., None], z, k, fog) + rng.normal(0, 3.0, (H, W, 3))
    depth = np.clip(z, 0.5, 10.0).astype(np.float32)
    if rng.random() < 0.3:  # a hole of invalid depth (a specular or out-of-range patch)
        hx, hy, hr = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(0.05, 0.15) * W
        depth[(u - hx) ** 2 + (v - hy) ** 2 < hr * hr] = 0.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), depth


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(depth_m, np.float64) * MM_PER_M), 0, codec.DEPTH_U16_MAX).astype(np.uint16)


# -- encoded samples (what both layouts write) -----------------------------------------------------------


def classification_chunk(seed: int, start: int, stop: int, image_size: int) -> list[dict[str, Any]]:
    out = []
    for i in range(start, stop):
        img, label = make_classification(seed, i, image_size)
        out.append({"sample_id": i, "image": _png(img), "label": label, "height": image_size, "width": image_size})
    return out


def segmentation_chunk(seed: int, start: int, stop: int, image_size: int) -> list[dict[str, Any]]:
    from storage.layouts.samples import class_pixels

    out = []
    for i in range(start, stop):
        img, mask, bg_index = make_segmentation(seed, i, image_size)
        out.append({"sample_id": i, "image": codec.encode_jpeg(img), "mask": mask, "height": image_size,
                    "width": image_size,
                    "class_pixels": class_pixels(mask, len(SEGMENTATION_CLASSES)), "bg_index": bg_index})
    return out


def depth_chunk(seed: int, start: int, stop: int, image_size: int) -> list[dict[str, Any]]:
    from storage.layouts.samples import depth_stats

    out = []
    for i in range(start, stop):
        img, depth = make_depth(seed, i, image_size)
        mm = depth_to_mm(depth)
        total_m, valid, lo, hi = depth_stats(mm)
        out.append({"sample_id": i, "image": codec.encode_jpeg(img), "depth": mm, "height": image_size,
                    "width": image_size,
                    "depth_sum_m": total_m, "depth_valid": valid, "_min_mm": lo, "_max_mm": hi})
    return out


def task_columns(task: str):
    """The packed dataset's columns of a task (storage.columns.Column), as its spec declares them."""
    from storage.columns import Column

    return tuple(Column(name, codec_name) for name, codec_name in get_task_spec(task).columns)


def _meta(spec: TaskSpec, depth_range_mm: tuple[int, int] | None) -> dict[str, Any]:
    channels = spec.channels
    if spec.name == "classification":
        return {"classes": list(CLASSIFICATION_CLASSES), "channels": channels}
    if spec.name == "segmentation":
        return {"classes": list(SEGMENTATION_CLASSES), "ignore_index": IGNORE_INDEX, "channels": channels}
    if spec.name == "depth":
        lo, hi = depth_range_mm or (500, 10000)
        return {"depth_scale": MM_PER_M, "min_depth_m": lo / MM_PER_M, "max_depth_m": hi / MM_PER_M,
                "channels": channels}
    return {**{k: v for k, v in spec.meta.items() if v is not None}, "channels": channels}


def _generator(spec: TaskSpec) -> Callable[..., list[dict[str, Any]]]:
    """The spec's chunk generator; mask_depth's is storage.synth's own (a background pool), not this contract."""
    if spec.synth is None or spec.name == "mask_depth":
        raise ValueError(f"task {spec.name!r}: synth_tasks makes tasks whose spec names a chunk generator "
                         "(mask_depth is storage.synth's)")
    return resolve_import_path(spec.synth, f"task {spec.name!r} synth")


def _check(spec: TaskSpec, samples: int, image_size: int) -> Callable[..., list[dict[str, Any]]]:
    fn = _generator(spec)
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if image_size < spec.min_image_size:
        raise ValueError(f"--image-size must be >= {spec.min_image_size} px for {spec.name}, got {image_size}")
    return fn


def index_extra(task: str) -> tuple[str, ...]:
    """Index columns (beyond storage's own) the task's samples bring, in this order: the training side
    reads these. Classification's `label` is also a declared column: ShardWriter copies it into the index."""
    return get_task_spec(task).index_extras


def _generator_name(spec: TaskSpec) -> str:
    # The built-in generators are recorded as this module, as before (manifests compare equal).
    module = (spec.synth or "").partition(":")[0]
    return module if module != __name__ else "storage.synth_tasks"


# The raw layout each built-in task's samples are written in by `--layout seed` (data pack reads it back).
_SEED_LAYOUTS = {"classification": "imagefolder", "segmentation": "images-masks", "depth": "rgb-depth"}


def synthesize_task(
    task: str,
    dest: str,
    samples: int,
    seed: int = 0,
    image_size: int | None = None,
    rows_per_shard: int = 4096,
    rows_per_group: int = 256,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a packed synthetic `task` dataset of `samples` samples (ids 0..samples-1); return its manifest.

    The bytes depend only on (task, seed, sample id, image_size), not on `workers`; `progress(n)`
    gets the number of samples just written after each chunk. `dest` must be empty or hold only
    files this tool writes (storage.dest_check), unless `force`.
    """
    from storage.dest_check import check_dest
    from storage.shards import ShardWriter  # the pool's workers never need pyarrow
    from storage.synth import default_workers, map_chunks

    spec = get_task_spec(task)
    image_size = int(image_size or spec.default_image_size)
    fn = _check(spec, samples, image_size)
    check_dest(dest, "data synth", force)
    workers = default_workers() if workers is None else max(1, int(workers))
    lo_hi: list[int] = []
    writer = ShardWriter(dest, rows_per_shard, rows_per_group, columns=task_columns(task), task=spec.name,
                         index_columns=spec.index_extras)
    with writer:
        for chunk in map_chunks(fn, samples, workers, seed, image_size):
            for s in chunk:
                if spec.name == "depth":  # the dataset's depth range, for meta; not index columns
                    lo, hi = s.pop("_min_mm"), s.pop("_max_mm")
                    if s["depth_valid"]:
                        lo_hi = [min(lo_hi[0], lo), max(lo_hi[1], hi)] if lo_hi else [lo, hi]
                writer.add(s)
            if progress is not None:
                progress(len(chunk))
        return writer.close({
            "meta": _meta(spec, tuple(lo_hi) if lo_hi else None),
            "source": "synth",
            "seed": seed,
            "image_size": [image_size, image_size],
            "synth": {"task": spec.name, "generator": _generator_name(spec), "version": 1},
        })


def synthesize_task_seed_layout(
    task: str,
    dest: str,
    samples: int,
    seed: int = 0,
    image_size: int | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The same samples as synthesize_task, as raw files in the layout `data pack --task TASK` takes:

      classification   DEST/<class>/<id>.png                      (an ImageFolder tree)
      segmentation     DEST/images/<id>.jpg, DEST/masks/<id>.png, DEST/classes.txt
      depth            DEST/rgb/<id>.jpg, DEST/depth/<id>.png     (16-bit millimetres, 0 = invalid)
    """
    from storage.seed_layout import _FolderSink
    from storage.synth import default_workers, map_chunks

    spec = get_task_spec(task)
    if spec.name not in _SEED_LAYOUTS:
        raise ValueError(f"task {spec.name!r}: --layout seed writes {', '.join(_SEED_LAYOUTS)} only; use --layout "
                         "shards")
    image_size = int(image_size or spec.default_image_size)
    fn = _check(spec, samples, image_size)
    dest = sfs.normalize(dest)
    workers = default_workers() if workers is None else max(1, int(workers))
    sink = _FolderSink(dest)
    for chunk in map_chunks(fn, samples, workers, seed, image_size):
        for s in chunk:
            i = s["sample_id"]
            if spec.name == "classification":
                sink.add(f"{CLASSIFICATION_CLASSES[s['label']]}/{i:06d}.png", s["image"])
            elif spec.name == "segmentation":
                sink.add(f"images/{i:06d}.jpg", s["image"])
                sink.add(f"masks/{i:06d}.png", _png(s["mask"]))
            else:
                sink.add(f"rgb/{i:06d}.jpg", s["image"])
                sink.add(f"depth/{i:06d}.png", _png(s["depth"]))
        sink.flush()
        if progress is not None:
            progress(len(chunk))
    sink.close()
    if spec.name == "segmentation":
        sfs.write_bytes(sfs.join(dest, "classes.txt"), ("\n".join(SEGMENTATION_CLASSES) + "\n").encode())
    return {"samples": samples, "uri": dest, "task": task, "layout": _SEED_LAYOUTS[spec.name]}
