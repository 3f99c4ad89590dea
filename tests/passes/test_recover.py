"""recover: the LayerMerge recovery fine-tune distils the teacher back into a damaged student, in place."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter
from torch.utils.data import TensorDataset

import depthfold
from depthfold import ir
from depthfold.errors import ConfigError
from depthfold.passes.recover import RecoverReport, recalibrate_batch_norm, recover
from depthfold.zoo.data import digits_datasets

BATCH = 32


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def make_teacher(seed: int = 0) -> SmallCNN:
    """A random-init CNN with non-trivial BN statistics and confident (large) logits."""
    torch.manual_seed(seed)
    model = SmallCNN()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.rand(8, generator=gen) * 0.2 - 0.1)
            bn.running_var.copy_(torch.rand(8, generator=gen) * 0.5 + 0.5)
        model.fc.weight.mul_(4.0)
    return model.eval()


def perturbed(model: nn.Module, scale: float = 0.5, seed: int = 1) -> nn.Module:
    """A deep copy with Gaussian noise of ``scale`` times each parameter's std added to its weights."""
    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=gen) * scale * max(std, 0.05))
    return student


def kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        s, t = F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1)
    return float(F.kl_div(s, t, reduction="batchmean", log_target=True))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def node_values(gm: GraphModule, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    """The values of the named fx nodes on input ``x`` (an independent check of the feature tap)."""
    interp = Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(x)
    by_name = {node.name: value for node, value in interp.env.items()}
    return [by_name[name] for name in names]


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    return digits_datasets(resolution=8, channels=1)


@pytest.fixture(scope="module")
def captured_pair(digits) -> tuple[GraphModule, GraphModule]:
    """(teacher, student) as captured GraphModules at batch size ``BATCH``."""
    train, _ = digits
    example = (train.tensors[0][:BATCH],)
    teacher = make_teacher()
    return ir.capture(teacher, example).graph_module, ir.capture(perturbed(teacher), example).graph_module


def test_recover_distils_teacher_into_perturbed_student(digits) -> None:
    train, test = digits
    teacher = make_teacher()
    student = perturbed(teacher).train()
    teacher_state, student_state = snapshot(teacher), snapshot(student)
    x_test = test.tensors[0]
    held_out_before = kl(student.eval(), teacher, x_test)
    student.train()

    report = recover(student, teacher, train, steps=60, lr=1e-2, batch_size=BATCH)

    assert isinstance(report, RecoverReport)
    held_out_after = kl(student.eval(), teacher, x_test)
    assert held_out_after < 0.5 * held_out_before, (held_out_before, held_out_after)
    assert report.steps == 60 and report.seconds > 0
    assert report.kl_after < 0.5 * report.kl_before
    assert report.loss_last < report.loss_first
    assert report.to_dict() == {"steps": 60, "seconds": report.seconds, "loss_first": report.loss_first,
                                "loss_last": report.loss_last, "kl_before": report.kl_before,
                                "kl_after": report.kl_after}
    after = snapshot(teacher)
    assert all(torch.equal(after[k], v) for k, v in teacher_state.items()), "teacher was modified"
    assert not teacher.training
    assert any(not torch.equal(v, student_state[k]) for k, v in student.state_dict().items() if "weight" in k)


def test_recover_restores_modes_and_never_touches_a_training_teacher(digits) -> None:
    train, _ = digits
    teacher = make_teacher().train()  # train-mode BN would update its running stats if run as such
    state = snapshot(teacher)
    student = perturbed(teacher).eval()
    report = recover(student, teacher, train, steps=3, batch_size=16, eval_batches=0)
    assert teacher.training and not student.training
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())
    assert report.kl_before != report.kl_before  # NaN: eval skipped
    assert depthfold.recover is recover


def test_recover_on_captured_graph_module(digits, captured_pair) -> None:
    train, test = digits
    teacher_gm, student_gm = captured_pair
    teacher_gm, student_gm = copy.deepcopy(teacher_gm), copy.deepcopy(student_gm)
    params = dict(student_gm.named_parameters())
    assert params and all(isinstance(p, nn.Parameter) for p in params.values())
    before = {k: p.detach().clone() for k, p in params.items()}
    x_test = test.tensors[0][:BATCH]
    held_out_before = kl(student_gm, teacher_gm, x_test)

    report = recover(student_gm, teacher_gm, train, steps=40, lr=1e-2, batch_size=BATCH)

    assert report.kl_after < 0.5 * report.kl_before
    assert kl(student_gm, teacher_gm, x_test) < 0.5 * held_out_before
    changed = [k for k, p in student_gm.named_parameters() if not torch.equal(p, before[k])]
    assert len(changed) == len(params)


def test_recover_with_labels(digits) -> None:
    train, _ = digits
    teacher = make_teacher()
    report = recover(perturbed(teacher), teacher, train.tensors, steps=5, batch_size=BATCH, label_weight=0.5)
    assert report.loss_first > 0


def test_feature_matching_on_graph_modules(digits, captured_pair) -> None:
    train, _ = digits
    teacher_gm, student_gm = copy.deepcopy(captured_pair[0]), copy.deepcopy(captured_pair[1])
    names = [n.name for n in student_gm.graph.nodes if n.op == "call_function"]
    feature = "relu_1" if "relu_1" in names else [n for n in names if "relu" in n][-1]
    x = train.tensors[0][:BATCH]

    def feature_mse() -> float:
        (s,), (t,) = node_values(student_gm, x, [feature]), node_values(teacher_gm, x, [feature])
        return float(F.mse_loss(s, t))

    mse_before = feature_mse()
    weight_before = student_gm.get_parameter("conv1.weight").detach().clone()
    recover(student_gm, teacher_gm, train, steps=40, lr=1e-2, batch_size=BATCH, feature_weight=1.0,
            features=[(feature, feature)])
    assert feature_mse() < 0.5 * mse_before
    # the feature tap shares the student's parameters: training through it updated student_gm
    assert not torch.equal(student_gm.get_parameter("conv1.weight"), weight_before)


def test_feature_matching_on_modules_uses_hooks(digits) -> None:
    train, _ = digits
    teacher = make_teacher()
    student = perturbed(teacher)
    report = recover(student, teacher, train, steps=5, batch_size=BATCH, feature_weight=1.0,
                     features=[("act1", "act1"), ("act2", "act2")])
    assert report.steps == 5
    assert not student._forward_hooks and not student.act1._forward_hooks and not teacher.act2._forward_hooks


def test_unknown_feature_names(digits, captured_pair) -> None:
    train, _ = digits
    teacher_gm, student_gm = captured_pair
    with pytest.raises(ConfigError, match=r"student graph has no node 'relu_9'.*Valid node names include \['conv2d'"):
        recover(student_gm, teacher_gm, train, steps=1, batch_size=BATCH, feature_weight=1.0,
                features=[("relu_9", "relu")])
    teacher = make_teacher()
    with pytest.raises(ConfigError, match=r"teacher has no submodule 'act3'.*did you mean 'act2'\? Valid names include \['conv1'"):
        recover(perturbed(teacher), teacher, train, steps=1, feature_weight=1.0, features=[("act1", "act3")])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, r"steps must be a positive integer, got 0"),
        ({"lr": 0.0}, r"lr must be positive, got 0.0"),
        ({"batch_size": 0}, r"batch_size must be a positive integer"),
        ({"temperature": -1.0}, r"temperature must be positive"),
        ({"label_weight": 1.0, "data": "inputs-only"}, r"label_weight=1.0 needs labels"),
        ({"data": torch.empty(0, 1, 8, 8)}, r"data is empty"),
        ({"data": [1, 2, 3]}, r"data must be .*TensorDataset.*got list"),
        ({"data": {"x": 1}}, r"data must be .*got dict"),
        ({"data": "wrong-shape"}, r"rejected a batch of inputs of shape \(16, 3, 8, 8\).*in_channels=1"),
        ({"feature_weight": 1.0}, r"needs features="),
    ],
)
def test_bad_arguments_raise_config_error(digits, kwargs, match) -> None:
    train, _ = digits
    teacher = make_teacher()
    student = perturbed(teacher)
    state = snapshot(student)
    data = kwargs.pop("data", train)
    if isinstance(data, str) and data == "inputs-only":
        data = train.tensors[0]
    elif isinstance(data, str) and data == "wrong-shape":
        data = torch.randn(16, 3, 8, 8)
    with pytest.raises(ConfigError, match=match):
        recover(student, teacher, data, **{"steps": 2, "batch_size": 16, **kwargs})
    assert all(torch.equal(student.state_dict()[k], v) for k, v in state.items())


def test_wrong_input_shape_on_graph_module_names_capture_shape(captured_pair) -> None:
    teacher_gm, student_gm = captured_pair
    with pytest.raises(ConfigError, match=r"shape \(8, 3, 8, 8\).*captured with .* of shape \(32, 1, 8, 8\)"):
        recover(student_gm, teacher_gm, torch.randn(8, 3, 8, 8), steps=1, batch_size=8)


def test_output_shape_mismatch(digits) -> None:
    train, _ = digits
    teacher = make_teacher()
    student = perturbed(teacher)
    student.fc = nn.Linear(8, 5)
    with pytest.raises(ConfigError, match=r"student outputs shape \(16, 5\) but the teacher \(16, 10\)"):
        recover(student, teacher, train, steps=1, batch_size=16)


def test_recalibrate_batch_norm_stores_the_statistics_each_norm_now_sees() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3),
                          nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).eval()
    x = torch.randn(40, 3, 8, 8) * 2 + 1
    model(x)
    gm = ir.capture(model, (x[:1],)).graph_module
    norms = [n for n in gm.graph.nodes if ir.ops.is_batch_norm(n)]
    assert len(norms) == 2
    teacher = copy.deepcopy(gm)
    assert recalibrate_batch_norm(gm, x, batch_size=64) == 2  # one batch: batch statistics = population
    for node in norms:
        tapped = GraphModule(gm, _tapped_graph(gm, node.args[0].name))
        with torch.no_grad():
            seen = tapped(x)
        mean, var = seen.mean((0, 2, 3)), seen.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(ir.get_param(gm, node.args[3]), mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ir.get_param(gm, node.args[4]), var, atol=1e-4, rtol=1e-4)
    # The original's statistics are untouched, and the recalibrated network now normalises its inputs.
    assert not torch.allclose(ir.get_param(teacher, norms[0].args[3]), ir.get_param(gm, norms[0].args[3]))
    # Several batches: the first norm's input does not depend on any norm, so its population statistics are
    # exact; the second norm's input was normalised with batch statistics on the way, so they are close.
    first_mean = ir.get_param(gm, norms[0].args[3]).clone()
    first_var = ir.get_param(gm, norms[0].args[4]).clone()
    assert recalibrate_batch_norm(gm, x, batch_size=7) == 2
    torch.testing.assert_close(ir.get_param(gm, norms[0].args[3]), first_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ir.get_param(gm, norms[0].args[4]), first_var, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ir.get_param(gm, norms[1].args[4]), var, atol=0.0, rtol=0.1)


def _tapped_graph(gm: GraphModule, name: str) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    env: dict = {}
    out = None
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node] = out = graph.node_copy(node, lambda n: env[n])
        if node.name == name:
            break
    graph.output(out)
    return graph


def test_recover_pass_distils_from_the_pipelines_original(digits) -> None:
    """The registered pass trains a copy of the current graph towards the original the manager keeps."""
    from depthfold.passes import PassContext, PassManager

    train, _ = digits
    example = (train.tensors[0][:1],)
    teacher = ir.capture(make_teacher(), example).graph_module
    damaged = ir.capture(perturbed(make_teacher()), example).graph_module
    before = snapshot(damaged)
    # The teacher is random (its batch-norm statistics are not the data's, its predictions not the labels), so
    # re-estimating statistics or fitting labels would move away from it.
    manager = PassManager(["recover:steps=60,lr=1e-2,batch_size=32,train_samples=512,eval_samples=128,"
                           "recalibrate_bn=false,label_weight=0"],
                          context=PassContext(data=train, original=teacher))
    result = manager.run(damaged, example)
    (record,) = result.records
    assert record.name == "recover" and not record.exact
    metrics = record.details["metrics"]
    assert metrics["after"]["kl"] < 0.5 * metrics["before"]["kl"], metrics
    assert metrics["original"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert record.details["samples"] == {"train": 512, "held_out": 128}
    assert result.graph_module is not damaged
    assert all(torch.equal(damaged.state_dict()[k], v) for k, v in before.items()), "the input graph was trained"


def test_recover_pass_in_optimize_is_followed_by_exact_passes_at_a_dynamic_batch(digits) -> None:
    """Example batch 1, recovery batches of 16: the captured graph has a dynamic batch."""
    train, _ = digits
    loader = torch.utils.data.DataLoader(train, batch_size=50)
    res = depthfold.optimize(make_teacher(), (train.tensors[0][:1],),
                             ["recover:steps=3,batch_size=16,train_samples=64,eval_samples=32", "fold_bn"],
                             data=loader)
    assert [r.name for r in res.records] == ["recover", "fold_bn"]
    assert res.records[0].details["recovery"]["steps"] == 3
    assert res.records[0].details["data"].startswith("DataLoader")
    assert res.records[1].changed  # the exact pass still folds the batch norms of the recovered graph


def test_recover_pass_needs_data() -> None:
    with pytest.raises(ConfigError, match="recover trains on data"):
        depthfold.optimize(make_teacher(), (torch.randn(1, 1, 8, 8),), ["recover:steps=2"])


def test_recover_pass_config_is_checked_before_capture() -> None:
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        depthfold.optimize(make_teacher(), (torch.randn(1, 1, 8, 8),), ["recover:steps=0"])


class BatchReshapeCNN(SmallCNN):
    """Reshapes with its own batch size, as Hugging Face EfficientNet's pooler does (captured statically, the
    batch of the example input would be baked into that reshape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).reshape(x.shape[0], -1))


def test_a_model_reshaping_with_its_batch_size_calibrates_at_batch_16(digits) -> None:
    train, _ = digits
    torch.manual_seed(0)
    res = depthfold.optimize(BatchReshapeCNN().eval(), (train.tensors[0][:1],),
                             ["recover:steps=2,batch_size=16,train_samples=48,eval_samples=16"], data=train)
    assert res.report["capture"]["batch"], res.report["capture"]
    assert res.records[0].details["recovery"]["steps"] == 2
    assert res.module(train.tensors[0][:16]).shape == (16, 10)


def test_recover_language_model_next_token_distillation_and_lm_loss() -> None:
    """kv_share then recover on a small decoder: per-token KL to the original falls; the LM loss option trains on
    the data's own token ids (on text with structure, next-token loss falls)."""
    from depthfold import zoo

    torch.manual_seed(0)
    model = zoo.create("llama_tiny", n_layers=2, vocab_size=64, dim=32, hidden=64, n_heads=2, n_kv_heads=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a model whose layers matter, so sharing K/V changes its outputs
    tokens = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(1))
    res = depthfold.optimize(model, (tokens[:1],), ["kv_share:preset=cla2,eval_samples=16,train_samples=16",
                                                    "recover:steps=60,lr=3e-4,batch_size=16,eval_samples=32"],
                             data=tokens)
    metrics = res.records[-1].details["metrics"]
    assert metrics["after"]["kl"] < 0.8 * metrics["before"]["kl"]
    assert metrics["after"]["perplexity"] is not None and metrics["original"]["perplexity"] is not None

    periodic = (torch.arange(16)[None] + torch.arange(96)[:, None]) % 8  # next token = current + 1 (mod 8)
    student = ir.to_module(ir.capture(model, (periodic[:1],)).graph_module)
    teacher = ir.capture(model, (periodic[:1],)).graph_module
    report = recover(student, teacher, periodic, steps=60, lr=3e-3, batch_size=16, lm_weight=1.0)
    assert report.loss_last < report.loss_first


def test_recover_cosine_objective_for_embedding_outputs() -> None:
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[2].weight.add_(0.5 * torch.randn_like(student[2].weight))
    x = torch.randn(256, 8)
    before = F.cosine_similarity(student(x), teacher(x)).mean()
    recover(student, teacher, x, steps=150, lr=1e-2, batch_size=32, objective="cosine")
    assert F.cosine_similarity(student(x), teacher(x)).mean() > before + 0.01
    with pytest.raises(ConfigError, match="objective"):
        recover(student, teacher, x, steps=1, objective="mse")
    with pytest.raises(ConfigError, match="token ids"):
        recover(student, teacher, x, steps=1, lm_weight=1.0)
