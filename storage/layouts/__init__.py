"""Raw layouts that `orchestrator data pack --task KIND` takes, one module per layout:

  mask_depth       storage.seed_layout (fg_bg, fg_bg_mask, depth, bg, labels) or a manifest
  classification   imagefolder (SOURCE/<class>/<image>), or manifest (image, label)
  segmentation     images_masks (images/ + masks/ + classes.txt), voc (Pascal VOC), or manifest (image, mask)
  depth            rgbd (rgb/ + depth/, 16-bit PNG millimetres or .npy metres), or manifest (image, depth)

`plan_task_source` picks the layout from what SOURCE holds and says so in one line when SOURCE is
not what the task takes. storage.layouts.samples turns one sample's files into column values.
"""

from __future__ import annotations

from common.tasks import get_task_spec
from storage import fs as sfs
from storage.layouts.base import (
    DEFAULT_TASK,
    EXPECTED,
    TASKS,
    BadSample,
    TaskPlan,
    check_task,
    detect_layout,
    wrong_layout,
)
from storage.source_plan import SourceError

__all__ = ["DEFAULT_TASK", "TASKS", "BadSample", "TaskPlan", "check_task", "detect_layout", "plan_task_source",
           "wrong_layout"]

# task -> layouts it packs (besides manifests): each task's spec says
TASK_LAYOUTS = {name: get_task_spec(name).layouts for name in TASKS}


def plan_task_source(task: str, source: str, columns: dict[str, str] | None = None, classes_file: str | None = None,
                     depth_units_per_m: float | None = None) -> TaskPlan:
    """The plan of a classification, segmentation or depth SOURCE (a folder layout or a manifest)."""
    check_task(task)
    if task == "mask_depth":
        raise ValueError("mask_depth sources are planned by storage.seed_layout.plan_source")
    if depth_units_per_m and task != "depth":
        raise SourceError(f"--depth-units-per-m applies to --task depth, not {task}")
    if classes_file and task == "depth":
        raise SourceError("--classes applies to --task classification (manifests) and segmentation, not depth")
    layout, found = detect_layout(source)
    if layout == "manifest":
        from storage.layouts.manifest import plan_task_manifest

        plan = plan_task_manifest(task, source, columns, classes_file)
    else:
        if columns:
            raise SourceError("--column applies to CSV/Parquet manifests only")
        if layout in ("missing", "empty"):
            raise SourceError(f"{sfs.normalize(source)}: empty source: {found}; --task {task} expects {EXPECTED[task]}")
        if layout not in TASK_LAYOUTS[task]:
            raise wrong_layout(source, task, layout, found)
        if layout == "imagefolder":
            from storage.layouts.imagefolder import plan_imagefolder

            if classes_file:
                raise SourceError(f"{sfs.normalize(source)}: --classes does not apply to an ImageFolder tree: its "
                                  "classes are its folder names, sorted")

            plan = plan_imagefolder(source)
        elif layout == "images_masks":
            from storage.layouts.images_masks import plan_images_masks

            plan = plan_images_masks(source, classes_file)
        elif layout == "voc":
            from storage.layouts.voc import plan_voc

            plan = plan_voc(source, classes_file)
        else:
            from storage.layouts.rgbd import plan_rgbd

            plan = plan_rgbd(source)
    if task == "depth" and depth_units_per_m:
        plan.options["units_per_m"] = float(depth_units_per_m)
    return plan

