"""Segmentation as image and mask folders:

  SOURCE/images/<name>.jpg|png            (sub-folders allowed)
  SOURCE/masks/<name>.png                 class-index map: pixel value = class id, 255 = ignore
  SOURCE/classes.txt                      one class name per line, line 1 = class 0

An image and its mask share the stem (relative path without extension). `annotations/` or
`labels/` are taken for `masks/` too (ADE20K names it so). Class names may also come from
`--classes FILE` (which wins over classes.txt).
"""

from __future__ import annotations

from storage import fs as sfs
from storage.layouts.base import (
    IMAGE_EXTS,
    IMAGES_DIRS,
    MASKS_DIRS,
    TaskPlan,
    list_folder,
    pair_folders,
    read_class_names,
    top_level,
)
from storage.source_plan import SourceError

MAX_CLASSES = 255  # uint8 masks, 255 = ignore


def check_classes(classes: list[str], where: str) -> list[str]:
    if len(classes) > MAX_CLASSES:
        raise SourceError(f"{where}: {len(classes)} classes; masks are 8-bit with 255 = ignore, so at most "
                          f"{MAX_CLASSES} classes")
    return classes


def segmentation_classes(source: str, classes_file: str | None, default: list[str] | None = None) -> list[str]:
    """Class names from --classes FILE, else SOURCE/classes.txt, else `default`; SourceError when none."""
    if classes_file:
        return check_classes(read_class_names(sfs.normalize(classes_file)), classes_file)
    uri = sfs.join(source, "classes.txt")
    if sfs.exists(uri):
        return check_classes(read_class_names(uri), uri)
    if default is not None:
        return default
    raise SourceError(f"{source}: no classes.txt; write the class names there, one per line (line 1 = class 0, "
                      "the mask value of that class), or pass --classes FILE")


def plan_images_masks(source: str, classes_file: str | None = None) -> TaskPlan:
    source = sfs.normalize(source)
    dirs, _ = top_level(source)
    img_dir = next((d for d in IMAGES_DIRS if d in dirs), None)
    mask_dir = next((d for d in MASKS_DIRS if d in dirs), None)
    if img_dir is None or mask_dir is None:
        missing = " and ".join(n for n, d in (("images/", img_dir), ("masks/", mask_dir)) if d is None)
        raise SourceError(f"{source}: no {missing}; --task segmentation expects images/ + masks/ + classes.txt (or a "
                          "Pascal VOC tree)")
    classes = segmentation_classes(source, classes_file)
    images = list_folder("image", sfs.join(source, img_dir))
    masks = list_folder("mask", sfs.join(source, mask_dir))
    samples, bad, unlisted = pair_folders(images, masks, ("image", "mask"), (IMAGE_EXTS, IMAGE_EXTS), ".png",
                                          f"{img_dir}/")
    return TaskPlan(source, "images-masks", [images, masks], samples, bad, unlisted, ("source",), task="segmentation",
                    file_kinds=("image", "mask"), meta={"classes": classes, "ignore_index": 255},
                    options={"num_classes": len(classes)})
