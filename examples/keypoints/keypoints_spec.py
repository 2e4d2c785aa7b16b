"""The keypoints task's spec: what it stores, trains with and compares on (torch-free, as every spec).

A task the orchestrator package does not ship: one keypoint per image (the centre of a bright
blob), learnt as a one-channel heatmap. A recipe names it by import path,
`task: keypoints_spec:KEYPOINTS`, with this folder on PYTHONPATH (or the package installed with an
`orchestrator.tasks` entry point, `keypoints = "keypoints_spec:KEYPOINTS"`).
"""

from __future__ import annotations

from common.task_spec import LossSlot, TaskSpec

KEYPOINTS = TaskSpec(
    name="keypoints",
    description="an RGB image in, a heatmap of its one keypoint out",
    columns=(("image", "image"), ("heatmap", "raw_u8")),  # the heatmap: 0..255, a Gaussian at the keypoint
    # Its own loss section, `loss.heatmap`: dense losses (one channel of logits against a target in [0, 1]).
    loss_sections={"heatmap": LossSlot("dense", {"bce": 1.0}, "Heatmap loss terms (name: weight).")},
    worker="keypoints_task:KeypointsTask",
    compare_columns=(("px error", "eval/px_error", "min"), ("baseline", "eval/px_error_baseline", None)),
    synth="keypoints_synth:keypoints_chunk",
    default_image_size=32,
    min_image_size=16,
)
