"""Graphs to bytes and back: same nodes, metadata, tensors and outputs, and nothing but allowlisted targets."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from torch import nn
from torch.fx import Graph, GraphModule

from depthfold import ir, zoo
from depthfold.errors import ArtifactError
from depthfold.ir import ops


def _depthfold_meta(gm: GraphModule) -> list[dict]:
    return [{k: v for k, v in n.meta.items() if k.startswith("depthfold.")} for n in gm.graph.nodes]


def _assert_same_graph(gm: GraphModule, back: GraphModule) -> None:
    assert [(n.name, n.op, str(n.target)) for n in back.graph.nodes] == \
        [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]
    assert back.code == gm.code
    assert ir.digest_graph(back) == ir.digest_graph(gm)
    assert _depthfold_meta(back) == _depthfold_meta(gm)
    assert all(key.startswith("depthfold.") for n in back.graph.nodes for key in n.meta)  # export's meta dropped
    assert ir.dynamic_dims(back) == ir.dynamic_dims(gm)
    params = dict(gm.named_parameters(remove_duplicate=False))
    assert {k: (type(p), p.requires_grad) for k, p in back.named_parameters(remove_duplicate=False)} == \
        {k: (type(p), p.requires_grad) for k, p in params.items()}
    assert [k for k, _ in back.named_buffers()] == [k for k, _ in gm.named_buffers()]
    assert back.training == gm.training


def _batch(inputs: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    return tuple(t.repeat(n, *([1] * (t.dim() - 1))) for t in inputs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "llama_tiny"])
def test_serialize_zoo_round_trip_is_faithful(name: str) -> None:
    torch.manual_seed(0)
    inputs = tuple(zoo.example_inputs(name))
    gm = ir.capture(zoo.create(name).eval(), inputs).graph_module
    back = ir.graph_from_bytes(ir.graph_to_bytes(gm))
    _assert_same_graph(gm, back)
    # Token inputs keep their sequence dynamic too (the Llama's rotary tables bound it to max_seq).
    assert ir.dynamic_dims(back)[0] == ((0, 1) if name == "llama_tiny" else (0,))
    with torch.no_grad():
        for batch in (inputs, _batch(inputs, 3)):  # the example batch and another (the batch is dynamic)
            assert torch.equal(back(*batch), gm(*batch))
        if name == "llama_tiny":
            longer = (torch.randint(0, 256, (2, 50)),)
            assert torch.equal(back(*longer), gm(*longer))


def test_serialize_hugging_face_model_keeps_its_output_type_and_dynamic_dims() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    gen = torch.Generator().manual_seed(0)

    def tokens(batch: int, seq: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, 100, (batch, seq), generator=gen),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long)}

    gm = ir.capture(transformers.BertModel(config).eval(), tokens(2, 8)).graph_module
    back = ir.graph_from_bytes(ir.graph_to_bytes(gm))
    _assert_same_graph(gm, back)
    assert ir.dynamic_dims(back) == ((0, 1), (0, 1))
    other = tokens(3, 11)
    with torch.no_grad():
        want, got = gm(*other.values()), back(*other.values())
    assert type(got) is type(want)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_serialize_keeps_tied_weights_tied_and_same_padding_readable() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding="same", bias=False)
            self.b = nn.Conv2d(4, 4, 3, padding="same", bias=False)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(1, 4, 8, 8)
    gm = ir.capture(Tied(), (x,)).graph_module
    back = ir.graph_from_bytes(ir.graph_to_bytes(gm))
    _assert_same_graph(gm, back)
    assert gm.a.weight is gm.b.weight and back.a.weight is back.b.weight
    # 'same' padding is read from the recorded shapes: the read-back graph has no export ``val`` metadata.
    convs = [n for n in back.graph.nodes if ops.is_conv(n)]
    assert convs and all("val" not in n.args[1].meta for n in convs)
    assert [ops.conv_params(n).padding for n in convs] == \
        [ops.conv_params(n).padding for n in gm.graph.nodes if ops.is_conv(n)]
    assert torch.equal(back(x), gm(x))


def test_portable_graph_pickles_through_bytes() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gm = ir.capture(zoo.create("resnet18", num_classes=10).eval(), (x,)).graph_module
    portable = ir.PortableGraph(gm)
    data = pickle.dumps(portable)
    assert pickle.dumps(portable) == data  # written once, however often it is shipped
    back = pickle.loads(data).graph_module
    _assert_same_graph(gm, back)
    with torch.no_grad():
        assert torch.equal(back(x), gm(x))


def _tampered(gm: GraphModule, edit) -> bytes:
    payload = torch.load(io.BytesIO(ir.graph_to_bytes(gm)), weights_only=True)
    payload["nodes"] = [edit(list(r)) for r in payload["nodes"]]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_graph() -> GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    return ir.capture(model, (torch.randn(1, 3, 8, 8),)).graph_module


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "torch.hub.load", "torch.load", "torch.os.system",
                                  "operator.attrgetter", "torch.Tensor.__reduce_ex__"])
def test_serialize_refuses_a_payload_naming_a_function_off_the_allowlist(small_graph, name: str) -> None:
    def edit(record: list) -> tuple:
        if record[1] == "call_function":
            record[2] = ("callable", name)
        return tuple(record)

    with pytest.raises(ArtifactError, match="not an allowed graph function"):
        ir.graph_from_bytes(_tampered(small_graph, edit))


def test_serialize_refuses_a_payload_naming_an_operator_that_reads_files(small_graph) -> None:
    def edit(record: list) -> tuple:
        if record[1] == "call_function":
            record[2] = ("op", "aten", "from_file", "default")
        return tuple(record)

    with pytest.raises(ArtifactError, match="from_file.*refused"):
        ir.graph_from_bytes(_tampered(small_graph, edit))


def test_serialize_refuses_attributes_that_are_not_its_tensors_and_foreign_pickles(small_graph) -> None:
    def edit(record: list) -> tuple:
        if record[1] == "get_attr":
            record[2] = "__class__"
        return tuple(record)

    with pytest.raises(ArtifactError, match="not one of its tensors"):
        ir.graph_from_bytes(_tampered(small_graph, edit))

    class Payload:
        def __reduce__(self):
            return os.system, ("echo should-not-run",)

    with pytest.raises(ArtifactError, match="not a depthfold graph payload"):
        ir.graph_from_bytes(pickle.dumps(Payload(), protocol=2))


def _not_allowed(x: torch.Tensor) -> torch.Tensor:
    return x


def test_serialize_refuses_to_write_a_graph_calling_an_arbitrary_function() -> None:
    graph = Graph()
    graph.output(graph.call_function(_not_allowed, (graph.placeholder("x"),)))
    with pytest.raises(ArtifactError, match="_not_allowed.*not an allowed graph function"):
        ir.graph_to_bytes(GraphModule(nn.Module(), graph))
