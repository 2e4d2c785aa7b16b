"""The typed recipe: YAML on disk, validated by pydantic, overridable with `--set a.b=value`."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.errors import RecipeError
from common.recipe_yaml import apply_override, format_validation_error, load_recipe_dict  # noqa: F401 - re-exported
from common.tasks import DEPTH_LOSS, LABELS_LOSS, MASK_LOSS, get_task_spec


class RecipeChecks(Protocol):
    """What only the layers above know (the model and loss registries, a model's parts and paths),
    handed to `validate_recipe` by the driver (orchestrator/recipes.py) so that common/ imports
    nothing above it. Without it a recipe is checked as far as common/ knows (the worker side,
    which gets a recipe the driver already checked)."""

    def model(self, name: str) -> str:
        """`name` if it names a model (registered, an entry point or an import path), else ValueError."""
        ...

    def loss(self, name: str) -> str:
        """`name` if it names a loss, else ValueError listing the valid ones."""
        ...

    def problems(self, recipe: Recipe) -> list[str]:
        """One line per problem of a recipe valid field by field, each starting with its dotted field."""
        ...


def _checks(info: ValidationInfo) -> RecipeChecks | None:
    return (info.context or {}).get("checks")

# Upper bounds where a bigger value is a typo, not a plan. 4096 px: a 4096x4096 input is 16.8 MP, far
# past any model here (the source trains at 224); `data pack` refuses bigger images by default.
MAX_RESOLUTION = 4096
MAX_WORKERS = 1024  # Ray Train workers (one per GPU or host)
MAX_DECODE_WORKERS = 64  # DataLoader processes per worker
MAX_THREADS = 1024  # CPUs per worker, torch threads
MAX_SYNTH_SAMPLES = 10_000_000
# data.shuffle_window_mb's default: the smallest round size above the quickstart dataset's 45 MB,
# so that its chunks stay one window and train the batches they trained before windows existed
# (its weights_sha256 unchanged). At 6,000 samples of 224 px in 64-row groups (207 MB, one chunk)
# the first batch then needs 21 of 94 row groups instead of the whole chunk. Smaller windows start
# sooner still (16 MB: 8 row groups) but shuffle within fewer samples. Do not change it: it is in
# _LATER_DEFAULTS, so a recipe that spells 48 out would get another sha256 (its run would refuse
# to resume), and one that leaves it out would plan other windows for a new run.
SHUFFLE_WINDOW_MB = 48


class _Strict(BaseModel):
    # Unknown keys are typos, and a typo silently ignored costs a night of training. A non-finite
    # number (`lr: .inf`, `.nan`) is never meant: refused in every float field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _no_credentials(v: Any) -> Any:
    """A URI field: credentials in it would be printed, logged to MLflow and stored in run.json."""
    from common.redact import credentials_problem

    problem = credentials_problem(v) if isinstance(v, str) else None
    if problem:
        raise ValueError(problem)
    return v


class RunSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Run name: the run's folder under `storage` and its MLflow run name.")
    storage: str = Field("runs", description="Run storage root, any fsspec URI; the run lives at <storage>/<name>.")
    seed: int = Field(0, description="Seed of the plan's permutations, initial weights and augmentation.")
    deterministic: bool = Field(True, description="Deterministic kernels and seeded order, so a resumed run "
                                                  "reproduces an uninterrupted one on CPU.")

    _storage_uri = field_validator("storage")(_no_credentials)


class SynthSection(_Strict):
    samples: int = Field(4096, ge=16, le=MAX_SYNTH_SAMPLES, description="Samples to synthesize when data.uri is empty.")
    seed: int = Field(0, description="Seed of the synthetic dataset.")
    image_size: int = Field(200, ge=8, le=MAX_RESOLUTION, description="Side of the synthesized square images, px "
                                                                      "(the source used 200; classification sets are "
                                                                      "28).")


class DataSection(_Strict):
    uri: str = Field("", description="Packed dataset URI (manifest.json + shards). Empty: synthesize to "
                                     "data/<run.name> (when data.synthesize is set).")
    synthesize: bool = Field(False, description="When uri is empty, synthesize a dataset on first run (quickstart).")
    synth: SynthSection = Field(default_factory=SynthSection, description="Synthetic dataset settings.")
    eval_samples: int = Field(256, ge=1, description="Held-out eval split size, kept apart from every training chunk.")
    expected_samples: int | None = Field(None, ge=1, description="If set, the dataset must hold exactly this many "
                                                                 "samples.")
    image_size: tuple[int, int] | None = Field(None, description="If set, every stored image must be this [height, "
                                                                 "width].")
    decode_workers: int = Field(0, ge=0, le=MAX_DECODE_WORKERS, description="DataLoader worker processes that decode "
                                                                            "the images; 0 decodes in the training "
                                                                            "process.")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip of a training sample.")
    shift: int = Field(0, ge=0, le=16, description="Random translation of a training image by up to this many px "
                                                   "(classification; zero-padded).")
    prefetch: bool = Field(True, description="Fetch the next chunk's bytes in the background while this chunk trains.")
    chunking: Literal["samples", "row_groups"] = Field(
        "samples",
        description="How chunks are cut. samples: each chunk a random slice of all samples, so at scale every chunk "
                    "touches nearly every stored row group and reads most of the dataset. row_groups: the shuffle "
                    "moves "
                    "whole row groups (~1 MB each), so a chunk reads about its own size; batches stay shuffled within "
                    "the chunk. Use row_groups for datasets of 100K samples and more.")
    shuffle: Literal["chunk", "window"] = Field(
        "window",
        description="How a worker orders a chunk's batches. window: its slice of the chunk cut into windows of "
                    "consecutive stored row groups (shuffle_window_mb each), the windows in a seeded order and the "
                    "samples shuffled inside each, so the first batch needs one window, not most of the chunk, and "
                    "training starts while the rest streams in. chunk: the whole slice shuffled at once (runs "
                    "planned before this field existed). Recorded in the run's plan at its start: a run keeps its "
                    "mode. A window mixes only samples stored near each other: data pack stores them shuffled, but "
                    "for a dataset packed with --order source (or before) from folders that group similar images "
                    "(classes, backgrounds) use chunk (README: Mind the stored order).")
    shuffle_window_mb: int = Field(
        SHUFFLE_WINDOW_MB, ge=1, le=1 << 20,
        description="window shuffle: stored MB (2^20 bytes) of row groups per window, at least one batch of "
                    "samples. A chunk slice within one window is shuffled exactly as by chunk.")

    _data_uri = field_validator("uri")(_no_credentials)


class ModelSection(_Strict):
    name: str = Field("unet224", description="Model name from the model registry (`orchestrator models`).")
    width: float = Field(1.0, gt=0.0, le=4.0, description="Channel width multiplier for models that take one; 1.0 "
                                                          "keeps the model's (or variant's) own (unet224: the "
                                                          "source's 17.5M params).")
    variant: str | None = Field(None, description="A named variant of the model (`orchestrator models` lists them), "
                                                  "e.g. basenet's baseline or best.")
    options: dict[str, Any] = Field(default_factory=dict, description="Constructor options of the model, over the "
                                                                      "variant's (e.g. basenet's batchnorm, dropout, "
                                                                      "channels, hidden).")
    init_from: str | None = Field(None, description="A state_dict to start from (e.g. torchvision's ImageNet weights "
                                                    "for the encoder), loaded with weights_only=True.")

    _init_from_uri = field_validator("init_from")(_no_credentials)

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = _non_finite(v)
        if bad:
            raise ValueError(f"{bad}: must be a finite number")
        return v

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str, info: ValidationInfo) -> str:
        checks = _checks(info)
        return checks.model(v) if checks else v


LossSpec = dict[str, Annotated[float, Field(ge=0.0)]]


def _non_finite(obj: Any, where: str = "") -> str | None:
    """The dotted key of the first non-finite float in a plain value (dicts, lists), else None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}" if where else str(k))
        if bad:
            return bad
    return None


def _check_loss_terms(v: dict[str, float], checks: RecipeChecks | None) -> dict[str, float]:
    if not v:
        if checks:
            checks.loss("")  # raises, listing the valid losses
        raise ValueError("needs at least one loss")
    for name in v:
        if checks:
            checks.loss(name)
    return v


class LossSection(_Strict):
    # A task from outside the package may train with loss sections of its own (its TaskSpec names
    # them): kept as extra keys, checked against the recipe's task by Recipe._task_fits.
    model_config = ConfigDict(extra="allow")

    mask: LossSpec = Field(default_factory=lambda: dict(MASK_LOSS.default), description=MASK_LOSS.description)
    depth: LossSpec = Field(default_factory=lambda: dict(DEPTH_LOSS.default), description=DEPTH_LOSS.description)
    depth_weight: float = Field(1.0, ge=0.0, description="Weight of the depth loss against the mask loss.")
    labels: LossSpec = Field(default_factory=lambda: dict(LABELS_LOSS.default), description=LABELS_LOSS.description)

    @field_validator("mask", "depth", "labels")
    @classmethod
    def _known_losses(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        return _check_loss_terms(v, _checks(info))

    def sections(self) -> dict[str, dict[str, float]]:
        """Every loss section by name (the built-in ones and a task's own), depth_weight left out."""
        out = {"mask": self.mask, "depth": self.depth, "labels": self.labels}
        out.update(self.__pydantic_extra__ or {})
        return out


class OptimizerSection(_Strict):
    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(1e-4, ge=0.0, description="Weight decay.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")


class StageSection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Stage name, shown in progress and MLflow.")
    forward: Literal["spine", "full"] = Field("full", description="Which network runs: the whole model, or (unet224) "
                                                                  "the 56-px spine alone.")
    trainable: list[str] = Field(default_factory=lambda: ["all"], min_length=1, description="Model parts whose "
                                 "weights train (unet224: head, spine, tail; others: encoder, decoder...); the rest "
                                 "are frozen.")
    resolution: int = Field(ge=16, le=MAX_RESOLUTION, description="Input side in px for this stage.")
    batch_size: int = Field(ge=1, description="Global batch size (split across workers).")
    chunk_size: int = Field(ge=1, description="Samples per chunk; the stage covers the training split once, chunk by "
                                              "chunk.")
    epochs_per_chunk: int = Field(1, ge=1, description="Passes over each chunk before moving to the next.")
    lr: float = Field(gt=0.0, description="Peak learning rate.")
    scheduler: Literal["onecycle", "constant"] = Field("onecycle", description="LR schedule over the stage's steps.")


class CheckpointSection(_Strict):
    every_steps: int = Field(200, ge=1, description="Checkpoint every N optimizer steps (and at every chunk end).")
    every_seconds: float = Field(600.0, gt=0,
                                 description="Checkpoint when this many seconds passed since the last one.")
    keep: int = Field(3, ge=2, description="Complete checkpoints kept (at least 2: a damaged newest one falls back "
                                           "to the one before); older ones are deleted.")
    preemption_poll_steps: int = Field(1, ge=1, description="Ask Ray for preemption notices every N steps (a "
                                                            "collective across workers).")
    background: bool = Field(True, description="Serialize and upload each checkpoint in the background while "
                                               "training goes on "
                             "(a snapshot in CPU memory at the step; at most one upload in flight; stops and the "
                             "run's end wait "
                             "for it); false saves on the training thread, which pauses for the whole upload.")


class TrackingSection(_Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; a relative sqlite path is relative to "
                                                        "the current directory.")
    experiment: str = Field("orchestrator", description="MLflow experiment name.")
    flush_every_steps: int = Field(20, ge=1, description="Train losses are sent to MLflow in batches of this many "
                                                         "steps.")
    grid_samples: int = Field(4, ge=1, le=16, description="Eval samples in the prediction grid logged at each stage "
                                                          "end.")

    _tracking_uri = field_validator("uri")(_no_credentials)


class ExecutionSection(_Strict):
    backend: Literal["ray", "local"] = Field("ray", description="ray: Ray Train TorchTrainer; local: the same loop "
                                                                "in-process (tests, debugging).")
    num_workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Ray Train workers (data-parallel ranks); the most "
                                                                  "when min_workers is set.")
    min_workers: int | None = Field(None, ge=1, le=MAX_WORKERS, description="Elastic: continue with as few as this "
                                                                            "many workers when no more are available.")
    use_gpu: bool = Field(False, description="Give each worker one GPU (DDP over NCCL).")
    use_tpu: bool = Field(False, description="Train on TPU VMs through torch_xla (untested here: no TPU, no "
                                             "torch_xla wheel for torch 2.13).")
    tpu_topology: str | None = Field(None, description="TPU pod slice topology, e.g. 2x2x1; Ray needs it with more "
                                                       "than one TPU worker.")
    tpu_accelerator_type: str | None = Field(None, description="TPU generation as Ray names it, e.g. TPU-V4; needed "
                                                               "with tpu_topology.")
    tpus_per_worker: int = Field(4, ge=1, le=64, description="TPU chips per worker (one worker per TPU VM host).")
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_THREADS, description="CPUs reserved per worker.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts Ray Train attempts before the run fails "
                                                    "(-1: unlimited).")
    worker_start_timeout_s: float = Field(
        60.0, gt=0, description="How long Ray Train waits for a worker group to start before it tries again (counts "
                                "as a "
        "failure); an elastic run then starts with the workers there are. Raise it where new nodes take minutes to "
        "boot.")
    torch_threads: int = Field(0, ge=0, le=MAX_THREADS, description="torch intra-op threads per worker; 0 = "
                                                                    "cpus_per_worker.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training precision: auto = bf16 on a CUDA GPU with native bf16, fp16 with a gradient "
                            "scaler "
        "on older CUDA GPUs (T4, V100), fp32 on CPU; bf16/fp16 autocast the forward pass, losses and weights "
        "stay fp32.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels_last memory format for conv models: auto = on for a CUDA GPU, off on CPU.")
    compile: bool = Field(False, description="torch.compile the model (checkpoints hold the un-compiled module's "
                                             "state_dict, the same either way).")
    max_nonfinite_steps: int = Field(
        5, ge=1, le=1000, description="Stop the run as diverged after this many non-finite (NaN/inf) losses in a "
                                      "row; no "
        "checkpoint is ever written after a non-finite loss, so the kept ones stay finite.")
    max_restarts_without_progress: int = Field(
        3, ge=1, le=100, description="Stop the run when its workers restart this many times in a row without "
                                     "committing "
        "a newer checkpoint (a chunk that OOMs, a crash at the same step), whatever max_failures says.")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ValueError(f"must be auto, true or false, got {v!r}")

    @model_validator(mode="after")
    def _elastic_range(self) -> ExecutionSection:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers={self.min_workers} exceeds num_workers={self.num_workers}")
        if self.use_gpu and self.use_tpu:
            raise ValueError("use_gpu and use_tpu are both set; pick one")
        if self.use_tpu and self.num_workers > 1 and not (self.tpu_topology and self.tpu_accelerator_type):
            raise ValueError("use_tpu with num_workers > 1 needs tpu_topology and tpu_accelerator_type (Ray places "
                             "one worker per TPU host)")
        return self


class Recipe(_Strict):
    run: RunSection
    task: str = Field("mask_depth", description="What the model learns, from the task registry: mask_depth (the "
                                                "source's), depth, segmentation or classification; or a TaskSpec by "
                                                "import path (module:attribute).")
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    stages: list[StageSection] = Field(min_length=1, description="Training stages, run in order.")
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        get_task_spec(v)  # a new task registers in common.tasks (or by entry point); nothing here lists them
        return v

    @model_validator(mode="before")
    @classmethod
    def _task_loss_defaults(cls, data: Any) -> Any:
        """A task's own loss sections (beyond mask, depth, labels) take their defaults from its spec."""
        if not isinstance(data, dict):
            return data
        try:
            spec = get_task_spec(str(data.get("task", "mask_depth")))
        except ValueError:
            return data  # the task field's own validator says why
        own = {k: v for k, v in spec.loss_sections.items() if k not in LossSection.model_fields}
        if not own or not isinstance(data.get("loss", {}), dict):
            return data
        data = {**data, "loss": dict(data.get("loss", {}))}
        for section, slot in own.items():
            data["loss"].setdefault(section, dict(slot.default))
        return data

    @model_validator(mode="after")
    def _unique_stage_names(self, info: ValidationInfo) -> Recipe:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        checks = _checks(info)
        problems = self._task_problems(checks) + (checks.problems(self) if checks else [])
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _task_problems(self, checks: RecipeChecks | None) -> list[str]:
        """What the task's spec alone tells: its own loss sections and the augmentations it applies."""
        spec = get_task_spec(self.task)
        problems = []
        for section, terms in (self.loss.__pydantic_extra__ or {}).items():
            if section not in spec.loss_sections:
                problems.append(f"loss.{section}: unknown field (check its spelling against the recipe reference "
                                "in README)")
                continue
            try:
                _check_loss_terms(TypeAdapter(LossSpec).validate_python(terms), checks)
            except (ValidationError, ValueError) as exc:
                why = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
                problems.append(f"loss.{section}: {why}")
        if self.data.shift and "shift" not in spec.augmentations:
            problems.append("data.shift: random shifts are a classification augmentation; set it to 0")
        return problems

    def sha256(self) -> str:
        """Identity of what the run trains, to tell a resumed run from a changed one.

        `execution` is left out: a run may resume with other resources (more workers, a GPU); so is
        `checkpoint.background`, which changes when a checkpoint is written, not what it holds.
        """
        dumped = self.model_dump(mode="json", exclude={"execution": True, "checkpoint": {"background"}})
        body = _without_later_defaults(dumped)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def flat_params(self) -> dict[str, str]:
        """The recipe flattened with dotted keys (stages by name), secrets redacted, for MLflow params."""
        from common.redact import redact

        out: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "name" in x for x in obj):
                for x in obj:
                    walk(f"{prefix}.{x['name']}", x)
            else:
                out[prefix] = redact(prefix, json.dumps(obj) if isinstance(obj, list) else str(obj))

        walk("", self.model_dump(mode="json"))
        return out


# Fields added after runs were already being made, with their defaults: left out of a recipe's
# identity while at their default, so a run started before they existed still resumes.
_LATER_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("task",): "mask_depth",
    ("data", "shift"): 0,
    ("data", "chunking"): "samples",
    ("data", "shuffle"): "window",
    ("data", "shuffle_window_mb"): SHUFFLE_WINDOW_MB,
    ("model", "variant"): None,
    ("model", "options"): {},
    ("model", "init_from"): None,
    ("loss", "labels"): {"cross_entropy": 1.0},
    # `execution` is outside the identity anyway (it may change between attempts); listed all the same.
    ("execution", "precision"): "auto",
    ("execution", "channels_last"): "auto",
    ("execution", "compile"): False,
    ("execution", "max_nonfinite_steps"): 5,
    ("execution", "max_restarts_without_progress"): 3,
}


def _without_later_defaults(body: dict[str, Any]) -> dict[str, Any]:
    for path, default in _LATER_DEFAULTS.items():
        node = body
        for key in path[:-1]:
            node = node.get(key, {})
        if node.get(path[-1], object()) == default:
            del node[path[-1]]
    return body


def validate_recipe(data: dict[str, Any], source: str = "recipe", checks: RecipeChecks | None = None) -> Recipe:
    """The recipe, or RecipeError with one line per problem. `checks`: what the layers above know
    (the driver passes workers.recipe_check's; orchestrator/recipes.py)."""
    try:
        return Recipe.model_validate(data, context={"checks": checks} if checks else None)
    except ValidationError as err:
        raise RecipeError(format_validation_error(source, err)) from None


def load_recipe(path: str, overrides: list[str] | None = None, checks: RecipeChecks | None = None) -> Recipe:
    data = copy.deepcopy(load_recipe_dict(path))
    for item in overrides or []:
        apply_override(data, item)
    return validate_recipe(data, source=path, checks=checks)
