"""Where a run's files live under <run.storage>/<run.name>/ (the one place that says so)."""

RUN_JSON = "run.json"  # the driver's record: recipe, state, MLflow run id
PLAN_JSON = "plan.json"  # plan summary; written after plan.npz, so it marks the plan complete
PLAN_NPZ = "plan.npz"  # eval ids and each stage's permutation of training ids
CURSOR_JSON = "cursor.json"  # a view of the newest committed checkpoint's cursor and chunk log
PROGRESS_JSON = "progress.json"  # live progress from the chief worker
FINAL_JSON = "final.json"  # final weights hash and metrics, written once training completes
ERROR_JSON = "error.json"  # a worker's user-facing failure message
RESTARTS_JSON = "restarts.json"  # the chief's record of worker-group starts: a run that restarts without progress stops
