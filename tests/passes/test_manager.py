"""PassManager: checks after every pass, errors that name the pass, ordering, fixed-point loops, records."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

from depthfold import ir
from depthfold.errors import PassError, PreconditionError, VerificationError
from depthfold.passes import Change, Exactness, PassManager, PassResult, register_pass
from depthfold.passes import registry as registry_module


@dataclass(frozen=True)
class NoConfig:
    pass


@dataclass(frozen=True)
class ScaleConfig:
    factor: float = 1.01


@contextlib.contextmanager
def _test_passes() -> Iterator:  # type: ignore[type-arg]
    """Register test passes under unique names; they are removed from the registry on exit."""
    added: list[str] = []

    def add(name: str, fn, *, exactness: Exactness = Exactness.EXACT, config: type = NoConfig,  # type: ignore[no-untyped-def]
            requires: tuple[str, ...] = (), idempotent: bool = True) -> str:
        assert name.startswith("_test_") and name not in registry_module._REGISTRY
        register_pass(name, exactness=exactness, config=config, requires=requires, idempotent=idempotent)(fn)
        added.append(name)
        return name

    try:
        yield add
    finally:
        for name in added:
            registry_module._REGISTRY.pop(name, None)


@pytest.fixture
def register() -> Iterator:  # type: ignore[type-arg]
    with _test_passes() as add:
        yield add


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def captured() -> ir.CapturedModel:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return ir.capture(model, (torch.randn(2, 3, 6, 6),))


def scale_first_conv(gm: GraphModule, config: ScaleConfig) -> PassResult:
    """Scale the first conv's weight (a deliberately wrong 'exact' rewrite)."""
    out = ir.clone(gm)
    conv = next(n for n in out.graph.nodes if ir.ops.is_conv(n))
    weight = conv.args[1]
    ir.set_param(out, weight, ir.get_param(out, weight) * config.factor)
    return PassResult(out, [Change("scale", (), (), {})])


def test_manager_broken_exact_pass_raises_verification_error(register, captured) -> None:  # type: ignore[no-untyped-def]
    name = register("_test_broken", scale_first_conv, config=ScaleConfig)
    with pytest.raises(VerificationError) as info:
        PassManager([name]).run(captured.graph_module, captured.example_inputs)
    message = str(info.value)
    assert repr(name) in message
    assert "first diverging node: 'conv2d'" in message


def test_manager_nan_producing_exact_pass_fails_verification(register, captured) -> None:  # type: ignore[no-untyped-def]
    name = register("_test_nan", scale_first_conv, config=ScaleConfig)
    with pytest.raises(VerificationError, match=f"'{name}'.*first diverging node: 'conv2d'"):
        PassManager([f"{name}:factor=nan"]).run(captured.graph_module, captured.example_inputs)


def test_manager_harmless_scale_passes_verification(register, captured) -> None:  # type: ignore[no-untyped-def]
    # The same pass with factor 1 is exact: the failure above is the scaling, not the plumbing.
    name = register("_test_unit_scale", scale_first_conv, config=ScaleConfig)
    result = PassManager([f"{name}:factor=1.0"]).run(captured.graph_module, captured.example_inputs)
    (record,) = result.records
    assert record.exact and record.changed
    assert record.error is not None and record.error["max_abs"] == 0.0


def test_manager_approximate_pass_reports_error_instead_of_raising(register, captured) -> None:  # type: ignore[no-untyped-def]
    name = register("_test_approx", scale_first_conv, config=ScaleConfig, exactness=Exactness.APPROXIMATE)
    result = PassManager([name]).run(captured.graph_module, captured.example_inputs)
    (record,) = result.records
    assert not record.exact
    assert record.error is not None and record.error["max_abs"] > 0


def test_manager_pass_exception_becomes_pass_error(register, captured) -> None:  # type: ignore[no-untyped-def]
    def explode(gm: GraphModule, config: NoConfig) -> PassResult:
        """Raise."""
        raise KeyError("boom")

    name = register("_test_explode", explode)
    with pytest.raises(PassError) as info:
        PassManager(["fold_bn", name]).run(captured.graph_module, captured.example_inputs)
    message = str(info.value)
    assert repr(name) in message and "KeyError" in message and "boom" in message
    assert "after fold_bn" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_manager_pass_returning_its_input_is_rejected(register, captured) -> None:  # type: ignore[no-untyped-def]
    def in_place(gm: GraphModule, config: NoConfig) -> PassResult:
        """Return the input graph module itself."""
        return PassResult(gm)

    name = register("_test_in_place", in_place)
    with pytest.raises(PassError, match=f"'{name}'.*new graph module"):
        PassManager([name]).run(captured.graph_module, captured.example_inputs)


def test_manager_pass_returning_wrong_type_is_rejected(register, captured) -> None:  # type: ignore[no-untyped-def]
    def wrong(gm: GraphModule, config: NoConfig) -> PassResult:
        """Return a bare graph module."""
        return ir.clone(gm)  # type: ignore[return-value]

    name = register("_test_wrong_type", wrong)
    with pytest.raises(PassError, match=name):
        PassManager([name]).run(captured.graph_module, captured.example_inputs)


def test_manager_pass_producing_unrunnable_graph_is_a_pass_error(register, captured) -> None:  # type: ignore[no-untyped-def]
    def bad_graph(gm: GraphModule, config: NoConfig) -> PassResult:
        """Give the linear a weight of the wrong shape."""
        out = ir.clone(gm)
        linear = next(n for n in out.graph.nodes if ir.ops.is_linear(n))
        ir.set_param(out, linear.args[1], torch.zeros(2, 5))
        return PassResult(out, [Change("break", (), (), {})])

    name = register("_test_bad_graph", bad_graph)
    with pytest.raises(PassError, match=name):
        PassManager([name]).run(captured.graph_module, captured.example_inputs)


def test_manager_pass_leaving_dangling_attribute_fails_structural_check(register, captured) -> None:  # type: ignore[no-untyped-def]
    def dangling(gm: GraphModule, config: NoConfig) -> PassResult:
        """Delete a parameter that a node still reads."""
        out = ir.clone(gm)
        del out.fc._parameters["bias"]
        return PassResult(out)

    name = register("_test_dangling", dangling)
    with pytest.raises(VerificationError, match="fc.bias"):
        PassManager([name]).run(captured.graph_module, captured.example_inputs)


def identity_pass(gm: GraphModule, config: NoConfig) -> PassResult:
    """Copy the graph and change nothing."""
    return PassResult(ir.clone(gm))


def test_manager_requires_enforces_order(register) -> None:  # type: ignore[no-untyped-def]
    first = register("_test_first", identity_pass)
    second = register("_test_second", identity_pass, requires=(first,))
    PassManager([first, second])  # fine
    with pytest.raises(PreconditionError, match=f"'{second}' requires '{first}'"):
        PassManager([second, first])
    with pytest.raises(PreconditionError):
        PassManager([second])


def test_manager_max_steps_stops_when_nothing_changes(register, captured) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def changes_twice(gm: GraphModule, config: NoConfig) -> PassResult:
        """Report a change on the first two calls only."""
        calls.append(1)
        changes = [Change("noop", (), (), {})] if len(calls) <= 2 else []
        return PassResult(ir.clone(gm), changes)

    name = register("_test_changes_twice", changes_twice, idempotent=False)
    result = PassManager([name], max_steps=10).run(captured.graph_module, captured.example_inputs)
    # steps 1 and 2 change something, step 3 does not, so there is no step 4
    assert len(calls) == 3
    assert [r.changed for r in result.records] == [True, True, False]


def test_manager_idempotent_pass_runs_once(register, captured) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def always_changes(gm: GraphModule, config: NoConfig) -> PassResult:
        """Claim a change every time."""
        calls.append(1)
        return PassResult(ir.clone(gm), [Change("noop", (), (), {})])

    name = register("_test_idempotent", always_changes, idempotent=True)
    result = PassManager([name], max_steps=4).run(captured.graph_module, captured.example_inputs)
    assert len(calls) == 1 and len(result.records) == 1


def test_manager_records_before_and_after(captured) -> None:  # type: ignore[no-untyped-def]
    result = PassManager(["fold_bn", "fuse_qkv"]).run(captured.graph_module, captured.example_inputs)
    fold, fuse = result.records
    assert fold.name == "fold_bn" and fold.exact and fold.changed
    assert fold.config == {"fold_before": True}
    assert fold.after["nodes"] == fold.before["nodes"] - 1  # the batch norm is gone
    assert fold.after["params"] < fold.before["params"]  # BN weight and bias (the conv gains nothing)
    assert fold.after["flops"] <= fold.before["flops"]
    assert fold.error is not None and fold.error["max_rel"] <= ir.TOLERANCE[torch.float32]
    assert fold.seconds >= 0
    assert fuse.before == fold.after and not fuse.changed
    assert set(fold.to_dict()) >= {"name", "changes", "skipped", "before", "after", "max_abs_error"}


def test_manager_does_not_modify_its_input(captured) -> None:  # type: ignore[no-untyped-def]
    gm = captured.graph_module
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    result = PassManager(["fold_bn"]).run(gm, captured.example_inputs)
    assert result.graph_module is not gm
    assert gm.code == code
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())


def test_manager_dump_dir(tmp_path, captured) -> None:  # type: ignore[no-untyped-def]
    PassManager(["fold_bn", "fuse_qkv"], dump_dir=tmp_path / "dump").run(
        captured.graph_module, captured.example_inputs)
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00_fold_bn.after.py", "00_fold_bn.before.py", "01_fuse_qkv.after.py",
                     "01_fuse_qkv.before.py"]
    before = (tmp_path / "dump" / "00_fold_bn.before.py").read_text()
    after = (tmp_path / "dump" / "00_fold_bn.after.py").read_text()
    assert "batch_norm" in before and "batch_norm" not in after


def test_manager_verify_off_skips_the_numeric_check(register, captured) -> None:  # type: ignore[no-untyped-def]
    name = register("_test_unverified", scale_first_conv, config=ScaleConfig)
    result = PassManager([name], verify=False).run(captured.graph_module, captured.example_inputs)
    assert result.records[0].error is None


def test_manager_test_passes_are_cleaned_up() -> None:
    with _test_passes() as add:
        name = add("_test_cleanup", scale_first_conv, config=ScaleConfig)
        assert name in registry_module._REGISTRY
    assert name not in registry_module._REGISTRY
    with pytest.raises(RuntimeError), _test_passes() as add:  # also when the test body fails
        name = add("_test_cleanup_on_error", scale_first_conv, config=ScaleConfig)
        raise RuntimeError("test failed")
    assert name not in registry_module._REGISTRY
    assert dataclasses.is_dataclass(NoConfig)
