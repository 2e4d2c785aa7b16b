"""Segmentation in the Pascal VOC layout (VOC2007/VOC2012, or SBD converted to it):

  SOURCE/JPEGImages/<id>.jpg
  SOURCE/SegmentationClass/<id>.png          palette PNG: the palette index IS the class id, 255 = border (ignore)
  SOURCE/ImageSets/Segmentation/train.txt    ids, one per line (val.txt, trainval.txt, test.txt likewise)

SOURCE may also be a VOCdevkit folder or the folder a VOC tar was unpacked into: the VOC20xx folder
under it is used. The samples are the ids of train.txt + val.txt (an index column `split` says
which), else of every list in ImageSets/Segmentation, else every mask in SegmentationClass.
Classes: SOURCE/classes.txt or --classes FILE when there is one, else VOC's 21.
"""

from __future__ import annotations

from storage import fs as sfs
from storage.layouts.base import (
    TaskPlan,
    find_voc_root,
    is_image,
    list_folder,
    read_text,
    stem,
    top_level,
)
from storage.layouts.images_masks import segmentation_classes
from storage.source_plan import FileRef, SampleRef, SourceError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
PREFERRED_SPLITS = ("train", "val")


def voc_palette() -> list[int]:
    """VOC's colour map (256 RGB triples, flattened): what its SegmentationClass PNGs carry."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def _split_lists(root: str) -> dict[str, list[str]]:
    sets = sfs.join(root, "ImageSets", "Segmentation")
    fs, path = sfs.filesystem(sets)
    if not fs.isdir(path):
        return {}
    names = [n for n in sfs.listdir(sets) if n.endswith(".txt")]
    lists = {n[:-4]: [ln.split()[0] for ln in read_text(sfs.join(sets, n)).splitlines() if ln.strip()]
             for n in sorted(names)}
    if any(s in lists for s in PREFERRED_SPLITS):
        return {s: lists[s] for s in PREFERRED_SPLITS if s in lists}
    return lists


def plan_voc(source: str, classes_file: str | None = None) -> TaskPlan:
    source = sfs.normalize(source)
    root = find_voc_root(source, top_level(source)[0])
    if root is None:
        raise SourceError(f"{source}: no JPEGImages/ and SegmentationClass/; not a Pascal VOC tree")
    classes = segmentation_classes(root, classes_file, default=list(VOC_CLASSES))
    images = list_folder("image", sfs.join(root, "JPEGImages"))
    masks = list_folder("mask", sfs.join(root, "SegmentationClass"))
    img_by_stem = {stem(m): m for m in sorted(images.entries) if is_image(m)}  # x.jpeg < x.jpg: .jpg wins
    mask_by_stem = {stem(m): m for m in masks.entries if m.lower().endswith(".png")}
    lists = _split_lists(root)
    split_of: dict[str, str] = {}
    for split, ids in lists.items():
        for i in ids:
            split_of.setdefault(i, split)
    wanted = sorted(split_of) if lists else sorted(mask_by_stem)
    samples: list[SampleRef] = []
    bad: list[dict[str, str]] = []
    for sid, key in enumerate(wanted):
        img, mask = img_by_stem.get(key), mask_by_stem.get(key)
        if img is None or mask is None:
            kind = "image" if img is None else "mask"
            where = images.path_of(f"{key}.jpg") if img is None else masks.path_of(f"{key}.png")
            listed = f" (listed in ImageSets/Segmentation/{split_of[key]}.txt)" if key in split_of else ""
            bad.append({"sample": str(sid), "path": where,
                        "reason": f"missing partner file ({kind}): {key}{listed} has no {kind} file"})
            continue
        files = {"image": FileRef(0, img, images.entries[img].stamp),
                 "mask": FileRef(1, mask, masks.entries[mask].stamp)}
        samples.append(SampleRef(sid, key, files, {"source": key, "split": split_of.get(key, "")}))
    return TaskPlan(root, "voc", [images, masks], samples, bad, [], ("source", "split"), task="segmentation",
                    file_kinds=("image", "mask"),
                    meta={"classes": classes, "ignore_index": 255, "splits": sorted(lists)},
                    options={"num_classes": len(classes)})
