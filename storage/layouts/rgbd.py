"""Depth as colour and depth folders (the NYU Depth v2 / KITTI export convention):

  SOURCE/rgb/<name>.jpg|png          (`images/` is taken for `rgb/` too; sub-folders allowed)
  SOURCE/depth/<name>.png            16-bit grayscale, millimetres (NYU), 0 = invalid
  SOURCE/depth/<name>.npy            or float metres (NaN, inf, <= 0 = invalid)

An image and its depth share the stem. PNG depth in other units (KITTI: 256 per metre) takes
`--depth-units-per-m 256`. Stored as raw uint16 millimetres.
"""

from __future__ import annotations

from storage import fs as sfs
from storage.layouts.base import (
    DEPTH_DIRS,
    IMAGE_EXTS,
    RGB_DIRS,
    TaskPlan,
    list_folder,
    pair_folders,
    top_level,
)
from storage.source_plan import SourceError

DEPTH_EXTS = (".png", ".npy", ".jpg", ".jpeg", ".bmp")  # the lossy/8-bit ones are listed to be named as bad
DEFAULT_RANGE_M = (0.1, 10.0)  # NYU Depth v2's


def plan_rgbd(source: str) -> TaskPlan:
    source = sfs.normalize(source)
    dirs, _ = top_level(source)
    rgb_dir = next((d for d in RGB_DIRS if d in dirs), None)
    depth_dir = next((d for d in DEPTH_DIRS if d in dirs), None)
    if rgb_dir is None or depth_dir is None:
        missing = " and ".join(n for n, d in (("rgb/", rgb_dir), ("depth/", depth_dir)) if d is None)
        raise SourceError(f"{source}: no {missing}; --task depth expects rgb/ + depth/ (16-bit PNG millimetres or .npy "
                          "metres)")
    rgb = list_folder("image", sfs.join(source, rgb_dir))
    depth = list_folder("depth", sfs.join(source, depth_dir))
    samples, bad, unlisted = pair_folders(rgb, depth, ("image", "depth"), (IMAGE_EXTS, DEPTH_EXTS), ".png",
                                          f"{rgb_dir}/")
    return TaskPlan(source, "rgb-depth", [rgb, depth], samples, bad, unlisted, ("source",), task="depth",
                    file_kinds=("image", "depth"), meta={"depth_scale": 1000}, options={})
