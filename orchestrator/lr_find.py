"""`orchestrator lr-find`: the LR range test of one stage, logged to MLflow as a curve and a plot."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from common.errors import RecipeError
from common.plan import plan_for_dataset
from common.recipe import Recipe
from orchestrator import tracking


def run_lr_find(recipe: Recipe, stage_name: str | None, steps: int, min_lr: float, max_lr: float,
                console: Console) -> dict[str, Any]:
    import torch

    from orchestrator.progress import count_progress
    from orchestrator.runner import open_data, task_info
    from workers.lr_range import lr_range_test, plot

    names = [st.name for st in recipe.stages]
    if stage_name is None:
        stage_name = names[0]
    if stage_name not in names:
        raise RecipeError(f"--stage {stage_name!r}: no such stage; valid: {', '.join(names)}")
    if not 0 < min_lr < max_lr:
        raise RecipeError(f"--min-lr {min_lr} / --max-lr {max_lr}: need 0 < min-lr < max-lr")
    s = names.index(stage_name)
    _, ds = open_data(recipe, console)  # opened and checked once
    plan = plan_for_dataset(recipe, ds)  # the run's own seeded split: eval samples stay out
    info = task_info(recipe, ds, plan.train_ids)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    uri = tracking.resolve_tracking_uri(recipe.tracking.uri)
    exp_id = tracking.ensure_experiment(uri, recipe.tracking.experiment)
    client = tracking._client(uri)
    run = client.create_run(exp_id, run_name=f"{recipe.run.name}-lr-find-{stage_name}",
                            tags={"orchestrator.kind": "lr-find", "orchestrator.lr_find.stage": stage_name})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[_param("stage", stage_name), _param("steps", steps), _param("min_lr", min_lr),
                                     _param("max_lr", max_lr), _param("batch_size", recipe.stages[s].batch_size),
                                     _param("resolution", recipe.stages[s].resolution),
                                     _param("model.width", recipe.model.width)])
    console.print(f"LR range test of stage '{stage_name}' on {device}: {steps} steps, lr {min_lr:g} -> {max_lr:g}; "
                  f"MLflow run {run_id}")
    with count_progress(console, "lr range test", steps) as advance:
        curve = lr_range_test(recipe, plan, ds, s, steps, min_lr, max_lr, device, info, on_step=lambda *_: advance(1))
    from mlflow.entities import Metric

    now = 0
    metrics = [Metric("lr_find/loss", v, now, i + 1)
               for i, v in enumerate(curve.losses) if v == v and abs(v) != float("inf")]
    metrics += [Metric("lr_find/lr", v, now, i + 1) for i, v in enumerate(curve.lrs)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    suggestion = curve.suggestion()
    for k, v in suggestion.items():
        if v is not None:
            client.log_metric(run_id, f"lr_find/suggested_{k}", v)
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        png = os.path.join(d, f"lr_find_{stage_name}.png")
        with open(png, "wb") as f:
            f.write(plot(curve, suggestion, f"LR range test, stage {stage_name}"))
        client.log_artifact(run_id, png)
    client.set_terminated(run_id, "FINISHED")
    return {"stage": stage_name, "steps_run": len(curve.lrs), "stopped_early": curve.stopped_early,
            "mlflow_run_id": run_id, **{f"suggested_{k}": v for k, v in suggestion.items()}}


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value))
