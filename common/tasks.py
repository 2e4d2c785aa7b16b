"""The task registry and the built-in tasks' specs: the one place that lists the tasks this package ships.

Adding an in-package task: a spec here, its worker half in workers/tasks/, a model in workers/models/,
and (for `data synth`) a chunk generator in storage/synth_tasks.py. See README "Add a task".
"""

from __future__ import annotations

from common.registry import Registry
from common.task_spec import LossSlot, TaskSpec

ENTRY_POINT_GROUP = "orchestrator.tasks"

def _is_spec(obj: object) -> str | None:
    if isinstance(obj, TaskSpec):
        return None
    return f"is a {type(obj).__name__}, not a common.task_spec.TaskSpec"


_SPECS: Registry[TaskSpec] = Registry("task", entry_points=ENTRY_POINT_GROUP, accepts=_is_spec)


def register_task_spec(spec: TaskSpec) -> TaskSpec:
    """Register a task under `spec.name`; registering a name twice is an error."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task_spec takes a TaskSpec, got {type(spec).__name__}")
    return _SPECS.register(spec.name)(spec)


def get_task_spec(name: str) -> TaskSpec:
    """The spec a recipe's `task:` names: a registered task, an `orchestrator.tasks` entry point, or a
    TaskSpec by import path ("mypkg.tasks:KEYPOINTS"). Unknown: ValueError listing the valid names."""
    return _SPECS.resolve(name)


def task_names() -> list[str]:
    """The built-in tasks' names, in their own order (help texts and errors list them so)."""
    return _SPECS.in_order()


# Stored depth of the classification/segmentation/depth datasets: integer millimetres (0 = no
# measurement), so this many stored units make a metre. (mask_depth's 16-bit depth is instead a
# fraction of the range: storage.codec.DEPTH_U16_MAX steps.)
MM_PER_M = 1000
# A segmentation mask's value for pixels that count in no loss and no metric.
IGNORE_INDEX = 255
# NYU Depth v2's usual evaluation range, for depth datasets whose manifest names none.
DEFAULT_DEPTH_RANGE_M = (0.1, 10.0)

# Loss sections shared by the tasks; their defaults are the recipe's (the source's final picks).
MASK_LOSS = LossSlot("dense", {"l1": 1.0, "dice": 1.0},
                     "Mask loss terms (name: weight); the source's final pick is L1 + Dice.")
DEPTH_LOSS = LossSlot("dense", {"rmse": 1.0, "ssim": 1.0},
                      "Depth loss terms (name: weight); the source's final pick is RMSE + SSIM.")
LABELS_LOSS = LossSlot("labels", {"cross_entropy": 1.0}, "Class-label loss terms (classification, segmentation).")

MASK_DEPTH = register_task_spec(TaskSpec(
    name="mask_depth",
    description="fg_bg/bg/mask/depth: the source's foreground mask and depth from a composite and its background",
    columns=(("fg_bg", "image"), ("bg", "image"), ("mask", "raw_u8"), ("depth", "raw_u16")),
    loss_sections={"mask": MASK_LOSS, "depth": DEPTH_LOSS},
    worker="workers.tasks.mask_depth:MaskDepthTask",
    train_keys=("train/loss", "train/mask_loss", "train/depth_loss"),
    compare_columns=(("mIoU", "eval/mask_iou", "max"), ("mRMSE", "eval/depth_rmse", "min")),
    index_extras=("depth_mean",),
    layouts=("seed",),
    sources="the mask_depth seed layout (fg_bg/, fg_bg_mask/, depth/, bg/ and labels/, as folders or zips) or a "
            "CSV/Parquet manifest",
    synth="storage.synth:synthesize",  # its own generator (a background pool shared by the samples)
    default_image_size=200,
    min_image_size=32,
))

CLASSIFICATION = register_task_spec(TaskSpec(
    name="classification",
    description="one image in (gray or RGB), a class label out",
    columns=(("image", "image"), ("label", "int64")),
    loss_sections={"labels": LABELS_LOSS},
    worker="workers.tasks.classification:ClassificationTask",
    compare_columns=(("accuracy", "eval/accuracy", "max"), ("baseline", "eval/accuracy_baseline", None)),
    index_extras=("label",),  # also a declared column: ShardWriter copies it into the index
    meta={"classes": None, "channels": 1},
    layouts=("imagefolder",),
    sources="an ImageFolder tree (SOURCE/<class>/<image>.jpg|png|bmp, one folder per class) or a CSV/Parquet "
            "manifest with image,label columns",
    synth="storage.synth_tasks:classification_chunk",
    default_image_size=28,
    min_image_size=8,
    channels=1,
    augmentations=("hflip", "shift"),
))

SEGMENTATION = register_task_spec(TaskSpec(
    name="segmentation",
    description="an RGB image in, a class per pixel out",
    columns=(("image", "image"), ("mask", "raw_u8")),
    loss_sections={"labels": LABELS_LOSS},
    worker="workers.tasks.segmentation:SegmentationTask",
    compare_columns=(("mIoU", "eval/miou", "max"), ("mAP", "eval/map", "max"),
                     ("mIoU baseline", "eval/miou_baseline", None)),
    index_extras=("class_pixels", "bg_index"),
    meta={"classes": None, "ignore_index": IGNORE_INDEX, "channels": 3},
    layouts=("images_masks", "voc"),
    sources="images/ + masks/ (same stems, PNG class-index maps, 255 = ignore) + classes.txt, a Pascal VOC tree "
            "(JPEGImages/, SegmentationClass/, ImageSets/Segmentation/), or a CSV/Parquet manifest with image,mask "
            "columns",
    synth="storage.synth_tasks:segmentation_chunk",
))

DEPTH = register_task_spec(TaskSpec(
    name="depth",
    description="an RGB image in, depth in metres out",
    columns=(("image", "image"), ("depth", "raw_u16")),
    loss_sections={"depth": DEPTH_LOSS},
    worker="workers.tasks.depth:DepthTask",
    compare_columns=(("a1", "eval/a1", "max"), ("rel", "eval/rel", "min"), ("rms", "eval/rms", "min"),
                     ("log10", "eval/log10", "min"), ("rms baseline", "eval/rms_baseline", None)),
    index_extras=("depth_sum_m", "depth_valid"),
    meta={"depth_scale": MM_PER_M, "min_depth_m": DEFAULT_DEPTH_RANGE_M[0], "max_depth_m": DEFAULT_DEPTH_RANGE_M[1],
          "channels": 3},
    layouts=("rgbd",),
    sources="rgb/ + depth/ (same stems; depth as 16-bit PNG in millimetres, 0 = invalid, or .npy in metres) "
            "or a CSV/Parquet manifest with image,depth columns",
    synth="storage.synth_tasks:depth_chunk",
))
