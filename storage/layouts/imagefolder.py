"""Classification in torchvision's ImageFolder layout: one folder per class.

  SOURCE/<class>/<image>.jpg|jpeg|png|bmp     (files may sit in sub-folders of a class folder)

Classes are the folder names sorted (class index = position), as torchvision does; samples are
numbered 0..N-1 in (class, path) order. Files directly under SOURCE and files with other
extensions are not packed (counted as unlisted). A class folder without images is a bad entry
(torchvision refuses those too); with --skip-bad it stays in the class list with no samples, so
class indices keep matching the folder order.
"""

from __future__ import annotations

from storage import fs as sfs
from storage.layouts.base import IMAGE_EXTS, TaskPlan, is_image, list_folder, top_level
from storage.source_plan import FileRef, SampleRef, SourceError

# Top-level folder names that are splits, not classes (SOURCE/train/<class>/...).
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def plan_imagefolder(source: str) -> TaskPlan:
    source = sfs.normalize(source)
    folder = list_folder("image", source)
    by_class: dict[str, list[str]] = {}
    unlisted: list[str] = []
    for member in folder.entries:
        if "/" not in member:
            unlisted.append(folder.path_of(member))
            continue
        cls = member.split("/", 1)[0]
        by_class.setdefault(cls, [])
        if is_image(member):
            by_class[cls].append(member)
        else:
            unlisted.append(folder.path_of(member))
    # Class folders holding nothing at all are not listed by find(): add the empty folders.
    for d in top_level(source)[0]:
        by_class.setdefault(d, [])
    if not by_class:
        raise SourceError(f"{source}: no class folders; --task classification expects SOURCE/<class>/<image> (one "
                          "folder per class)")
    classes = sorted(by_class)
    nested = [m for ms in by_class.values() for m in ms]
    if set(c.lower() for c in classes) <= SPLIT_NAMES and nested and all(m.count("/") >= 2 for m in nested):
        first = sfs.join(source, classes[0])
        raise SourceError(f"{source}: its folders ({', '.join(classes)}) look like splits that hold class folders, not "
                          f"classes; point SOURCE at one split (e.g. {first}), whose folders are the classes")
    bad = []
    samples: list[SampleRef] = []
    for label, cls in enumerate(classes):
        members = sorted(by_class[cls])
        if not members:
            bad.append({"sample": f"class {cls}", "path": sfs.join(source, cls),
                        "reason": f"empty class folder: no {'/'.join(e.lstrip('.') for e in IMAGE_EXTS)} files in it; "
                                  "add images or remove the folder"})
            continue
        for m in members:
            e = folder.entries[m]
            samples.append(SampleRef(len(samples), m, {"image": FileRef(0, m, e.stamp)}, {"label": label, "source": m}))
    return TaskPlan(source, "imagefolder", [folder], samples, bad, sorted(unlisted), ("source",),
                    task="classification", file_kinds=("image",), meta={"classes": classes},
                    options={"num_classes": len(classes)})
