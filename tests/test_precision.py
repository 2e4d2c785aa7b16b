"""execution.precision / channels_last / compile: resolution, the fp16 scaler in checkpoints, and
a bf16 run that survives a real SIGKILL bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import RecipeError
from common.recipe import load_recipe, validate_recipe
from storage import checkpoints
from tests.conftest import (
    assert_completed_exactly_once,
    kill_group,
    run_cli,
    start_cli,
    tiny_recipe,
    wait_for_cursor,
    write_recipe,
)
from workers import precision as P
from workers.state import TrainState

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# ------------------------------------------------------------------------------ resolution rules
def test_auto_is_fp32_on_cpu_and_picks_by_gpu_generation_on_cuda(monkeypatch) -> None:
    """auto: fp32 on CPU; bf16 on a CUDA GPU with native bf16; fp16 (with a scaler) on older ones."""
    assert P.resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setattr(P, "cuda_bf16_native", lambda: True)
    assert P.resolve_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(P, "cuda_bf16_native", lambda: False)  # a T4 or a V100
    assert P.resolve_precision("auto", CUDA) == "fp16"
    assert [P.resolve_precision(v, CPU) for v in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="execution.precision"):
        P.resolve_precision("fp16", torch.device("meta"))


def test_the_cpu_default_is_plain_fp32_no_autocast_no_scaler_no_channels_last() -> None:
    """The default recipe on CPU must train exactly as before these fields existed."""
    recipe = validate_recipe(tiny_recipe("unused"))
    ex = recipe.execution
    assert (ex.precision, ex.channels_last, ex.compile) == ("auto", "auto", False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    prec = P.Precision.resolve(ex, CPU, model)
    assert (prec.name, prec.channels_last, prec.compile, prec.low) == ("fp32", False, False, False)
    assert prec.make_scaler() is None
    assert prec.prepare_model(model) is model
    assert model[0].weight.is_contiguous()
    x = torch.randn(2, 3, 8, 8)
    assert prec.prepare_input(x) is x
    with prec.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert "precision fp32 (auto)" in prec.describe()
    assert prec.tags() == {"orchestrator.precision": "fp32", "orchestrator.channels_last": "false",
                           "orchestrator.compile": "false"}


def test_channels_last_auto_is_on_for_cuda_conv_models_only() -> None:
    conv, mlp = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(3, 4)
    assert P.resolve_channels_last("auto", CUDA, conv) is True
    assert P.resolve_channels_last("auto", CUDA, mlp) is False
    assert P.resolve_channels_last("auto", CPU, conv) is False
    assert P.resolve_channels_last(True, CPU, mlp) is True


def test_bf16_on_cpu_autocasts_the_forward_and_the_loss_input_back_to_fp32() -> None:
    recipe = validate_recipe(tiny_recipe("unused", execution={"backend": "local", "precision": "bf16"}))
    prec = P.Precision.resolve(recipe.execution, CPU, torch.nn.Conv2d(1, 1, 1))
    assert prec.name == "bf16" and prec.make_scaler() is None
    conv = torch.nn.Conv2d(2, 3, 3)
    with prec.autocast():
        out = conv(torch.randn(1, 2, 8, 8))
    assert out.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32
    assert P.as_float(out).dtype == torch.float32
    assert [t.dtype for t in P.as_float((out, out))] == [torch.float32] * 2


def test_compile_trains_through_a_compiled_wrapper_and_saves_the_plain_module() -> None:
    """torch.compile is lazy; the state_dict a checkpoint takes is the un-compiled module's, same keys."""
    recipe = validate_recipe(tiny_recipe("unused", execution={"backend": "local", "compile": True}))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    prec = P.Precision.resolve(recipe.execution, CPU, model)
    wrapped = prec.prepare_model(model)
    assert wrapped is not model and wrapped._orig_mod is model
    assert list(model.state_dict()) == ["0.weight", "0.bias"]


@pytest.mark.parametrize(("field", "value", "expect"), [
    ("precision", "fp8", "Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    ("channels_last", "sometimes", "must be auto, true or false"),
    ("compile", "perhaps", "valid boolean"),
])
def test_a_bad_value_is_one_line_naming_the_field(tmp_path, field, value, expect) -> None:
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe("unused"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [f"execution.{field}={value}"])
    msg = str(err.value)
    assert "\n" not in msg and f"field 'execution.{field}'" in msg and expect in msg, msg


def test_new_fields_leave_the_recipe_identity_alone() -> None:
    """A run started before these fields existed resumes: its recipe sha256 is unchanged; and
    they are execution settings, which may change between attempts of one run."""
    base = validate_recipe(tiny_recipe("d")).sha256()
    for ex in ({"precision": "bf16"}, {"channels_last": True}, {"compile": True},
               {"precision": "auto", "channels_last": "auto"}):
        assert validate_recipe(tiny_recipe("d", execution={"backend": "local", **ex})).sha256() == base


# ------------------------------------------------------------------ fp16 scaler in a checkpoint
def _fp16_state(growth_interval: int = 3) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    st = TrainState(model=model,
                    scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval))
    st.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    st.optimizer_stage = 0
    return st


def _scaled_step(st: TrainState, x: torch.Tensor, poison: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.float16):
        loss = st.model(x).float().square().mean()
    st.optimizer.zero_grad(set_to_none=True)
    st.scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
    st.scaler.step(st.optimizer)
    st.scaler.update()


def test_fp16_scaler_state_round_trips_through_a_real_checkpoint(tmp_path) -> None:
    """GradScaler works on this torch's CPU (enabled=True, not a stand-in): a scale backed off by an
    inf step and a growth tracker mid-interval survive write_local/read_local/restore, and the
    restored run then steps exactly as the uninterrupted one."""
    st = _fp16_state()
    x = torch.randn(8, 4)
    for poison in (False, True, False, False):  # 1 good, 1 inf (scale halves, tracker resets), 2 good
        _scaled_step(st, x, poison)
    scale, tracker = st.scaler.get_scale(), int(st.scaler._growth_tracker)
    assert (scale, tracker) == (2.0**9, 2)

    sd = st.state_dict()
    checkpoints.write_local(str(tmp_path / "ckpt"), sd, {"name": "ckpt"})
    loaded, _ = checkpoints.read_local(str(tmp_path / "ckpt"))
    assert loaded["scaler"]["scale"] == scale and loaded["scaler"]["_growth_tracker"] == tracker

    again = _fp16_state()
    again.load_model_and_progress(loaded)
    again.load_optimizer(loaded)
    assert again.scaler.state_dict() == st.scaler.state_dict()
    for _ in range(2):  # the 3rd good step in a row grows the scale, in both
        _scaled_step(st, x)
        _scaled_step(again, x)
    assert again.scaler.get_scale() == st.scaler.get_scale() == 2.0**10
    assert all(torch.equal(a, b)
               for a, b in zip(st.model.state_dict().values(), again.model.state_dict().values(), strict=True))


def test_fp32_checkpoints_hold_no_scaler_key() -> None:
    """An fp32 (or bf16) checkpoint holds exactly what it held before fp16 support."""
    st = TrainState(model=torch.nn.Linear(2, 1))
    assert "scaler" not in st.state_dict()
    fp16 = _fp16_state()
    fp16.load_scaler(st.state_dict())  # a checkpoint without one: the scaler keeps its fresh state
    assert fp16.scaler.state_dict()["scale"] == 2.0**10


# ----------------------------------------------------------- bf16 run, SIGKILLed, bit-identical
def test_bf16_run_sigkilled_and_resumed_ends_bit_identical_to_an_uninterrupted_bf16_run(tmp_path, tiny_dataset):
    """SIGKILL the real `orchestrator run` process group of a bf16 run mid-stage-2, run it again:
    same weights as an uninterrupted bf16 run. Both runs go at once (one core each) to save time."""
    recipe = tiny_recipe(tiny_dataset,
                         execution={"backend": "local", "num_workers": 1, "cpus_per_worker": 1, "precision": "bf16"})
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref = start_cli("run", write_recipe(ref_dir / "r.yaml", recipe), cwd=ref_dir, log=ref_dir / "run.log")
    path = write_recipe(kill_dir / "r.yaml", recipe)
    proc = start_cli("run", path, cwd=kill_dir, log=kill_dir / "attempt1.log")
    try:
        wait_for_cursor(kill_dir / "runs" / "tiny", lambda c: c["stage"] == 1 and c["batch"] > 0, proc)
    finally:
        kill_group(proc)
    again = run_cli("run", path, cwd=kill_dir)
    try:
        assert ref.wait(timeout=300) == 0, (ref_dir / "run.log").read_text()[-2000:]
    finally:
        kill_group(ref)
    assert again.returncode == 0, again.stderr
    assert "precision bf16 on cpu" in again.stderr  # shown once in the run's log
    assert "precision bf16 on cpu" in (ref_dir / "run.log").read_text()

    ref_sha = json.loads((ref_dir / "runs" / "tiny" / "final.json").read_text())["weights_sha256"]
    st = assert_completed_exactly_once(kill_dir, ref_sha)

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{kill_dir / 'mlflow.db'}").get_run(st["mlflow_run_id"])
    assert run.data.params["execution.precision"] == "bf16"
    assert run.data.tags["orchestrator.precision"] == "bf16"
    state, _ = checkpoints.read_local(str(kill_dir / "runs" / "tiny"
                                          / checkpoints.list_complete(str(kill_dir / "runs" / "tiny"))[-1]))
    assert "scaler" not in state  # bf16 needs no loss scaler
