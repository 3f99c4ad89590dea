"""A faithful, safe byte form of a GraphModule, so graphs can be shipped to other processes and machines.

Exported GraphModules do not pickle, and regenerating them from ``gm.code`` would lose the node names and
metadata that analyses refer to. :func:`graph_to_bytes` records every node (name, op, target, args,
kwargs), the graph's input/output packing (pytree specs as JSON), the ``depthfold.*`` node metadata
(:mod:`depthfold.ir.graph`; export's ``val`` FakeTensors and stack traces are dropped) and every tensor
(parameters, buffers, constants). The payload is a ``torch.save`` file of tensors and tagged primitive
tuples that :func:`graph_from_bytes` reads with ``torch.load(weights_only=True)``, and targets are names
resolved against an allowlist (ATen-style ops, and tensor-maths functions of ``operator``, ``math``,
``builtins`` and torch), so loading a payload never runs code it names: it is never arbitrary code.
"""

from __future__ import annotations

import importlib
import io
import keyword
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.fx.node import _get_qualified_name
from torch.utils import _pytree as pytree

from ..errors import ArtifactError

__all__ = ["PortableGraph", "graph_from_bytes", "graph_to_bytes"]

_FORMAT = "depthfold.graph"
_VERSION = 1
_META_PREFIX = "depthfold."
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "output")
_ROOTS = ("operator", "_operator", "math", "builtins", "torch")
"""Modules whose functions a graph may call by name (besides ``torch.ops`` operators)."""
_TORCH_MODULES = ("torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._linalg",
                  "torch._C._fft", "torch._C._special", "torch._C._VariableFunctions", "torch.linalg", "torch.fft",
                  "torch.special", "torch.fx.experimental.symbolic_shapes", "torch.fx.experimental.sym_node")
"""torch's tensor-maths namespaces: its other submodules load files (``torch.serialization``), fetch and run
code (``torch.hub``, ``torch.package``, ``torch.utils.cpp_extension``) or compile, none of which a graph needs."""
_REFUSED = {"eval", "exec", "compile", "open", "input", "breakpoint", "getattr", "setattr", "delattr", "globals",
            "locals", "vars", "exit", "quit", "help", "attrgetter", "methodcaller", "call", "load", "save",
            "from_file"}
"""Names refused even in allowed modules and operator namespaces: they run source, reach attributes by name or
touch files."""


def graph_to_bytes(gm: GraphModule) -> bytes:
    """``gm`` as bytes that :func:`graph_from_bytes` turns back into an equal GraphModule.

    Raises:
        ArtifactError: the graph calls a submodule, calls a function outside the allowlist, or holds a value
            (in args or ``depthfold.*`` metadata) this format has no tag for.
    """
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, tuple[str, bool]] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    modules: list[tuple[str, bool]] = []
    for path, module in gm.named_modules(remove_duplicate=False):
        if path and type(module) is not nn.Module:
            raise ArtifactError(f"cannot serialise submodule {path!r} ({type(module).__name__}): only graphs whose "
                                "submodules just hold tensors, as torch.export produces, can be written")
        modules.append((path, module.training))
        entries = [(n, t, ("parameter", t.requires_grad)) for n, t in module._parameters.items() if t is not None]
        entries += [(n, t, ("buffer", n not in module._non_persistent_buffers_set))
                    for n, t in module._buffers.items() if t is not None]
        for name, tensor, kind in entries:
            _remember(f"{path}.{name}" if path else name, tensor, kind, tensors, kinds, aliases, seen)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in kinds and node.target not in aliases:
            owner, _, attr = str(node.target).rpartition(".")
            value = getattr(gm.get_submodule(owner) if owner else gm, attr)
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"cannot serialise get_attr {node.name!r}: {node.target!r} is a "
                                    f"{type(value).__name__}, not a tensor")
            _remember(str(node.target), value, ("constant", False), tensors, kinds, aliases, seen)
    literals: list[torch.Tensor] = []
    nodes = [_encode_node(node, literals) for node in gm.graph.nodes]
    payload = {
        "format": _FORMAT, "version": _VERSION, "class_name": type(gm).__name__, "nodes": nodes,
        "codegen": _encode_codegen(gm.graph), "spec_attrs": hasattr(gm, "_in_spec") and hasattr(gm, "_out_spec"),
        "modules": modules, "tensors": tensors, "kinds": kinds, "aliases": aliases, "literals": literals,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def graph_from_bytes(data: bytes) -> GraphModule:
    """The GraphModule :func:`graph_to_bytes` wrote: same nodes, metadata, packing and tensors.

    Raises:
        ArtifactError: ``data`` is not such a payload, or names an operator, function or attribute this
            format does not allow (nothing it names is run while loading).
    """
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # any unpickling failure means the bytes are not a payload of ours
        raise ArtifactError(f"not a depthfold graph payload: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ArtifactError("not a depthfold graph payload (no 'depthfold.graph' format tag)")
    if payload.get("version") != _VERSION:
        raise ArtifactError(f"depthfold graph payload version {payload.get('version')!r}; this depthfold reads "
                            f"version {_VERSION}: write it again with this version")
    try:
        return _build(payload)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ArtifactError(f"malformed depthfold graph payload: {type(err).__name__}: {err}") from err


def _build(payload: dict[str, Any]) -> GraphModule:
    """Modules and tensors first, then the graph over them (every get_attr must name one of the tensors)."""
    gm = GraphModule(nn.Module(), Graph(), class_name=str(payload["class_name"]))
    for path, _ in payload["modules"]:
        if path:
            owner, _, name = path.rpartition(".")
            _check_attr(path, name)
            gm.get_submodule(owner).add_module(name, nn.Module())
    state: dict[str, torch.Tensor] = {}
    for name, (kind, flag) in payload["kinds"].items():
        state[name] = _install(gm, name, kind, flag, payload["tensors"][name])
    for name, canonical in payload["aliases"].items():
        kind, flag = payload["kinds"][canonical]
        _install(gm, name, kind, flag, state[canonical])
    graph = Graph()
    env: dict[str, Node] = {}
    names = set(state) | set(payload["aliases"])
    for record in payload["nodes"]:
        _decode_node(graph, record, env, names, payload["literals"])
    graph.set_codegen(_decode_codegen(payload["codegen"]))
    gm.graph = graph  # recompiles
    for path, training in payload["modules"]:
        gm.get_submodule(path).training = training
    if payload["spec_attrs"] and isinstance(graph._codegen, _PyTreeCodeGen):
        gm._in_spec = graph._codegen.pytree_info.in_spec
        gm._out_spec = graph._codegen.pytree_info.out_spec
    return gm


class PortableGraph:
    """A GraphModule that pickles as :func:`graph_to_bytes`, so executors can ship it to their workers;
    used in its own process it costs nothing.

    The bytes are made on the first pickling and reused after (a graph shipped to many jobs is written
    once): do not modify ``graph_module`` after shipping it.
    """

    def __init__(self, graph_module: GraphModule) -> None:
        self.graph_module = graph_module
        self._data: bytes | None = None

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        if self._data is None:
            self._data = graph_to_bytes(self.graph_module)
        return _portable_from_bytes, (self._data,)


def _portable_from_bytes(data: bytes) -> PortableGraph:
    portable = PortableGraph(graph_from_bytes(data))
    portable._data = data  # shipping it on from here costs nothing either
    return portable


def _remember(name: str, tensor: torch.Tensor, kind: tuple[str, bool], tensors: dict[str, torch.Tensor],
              kinds: dict[str, tuple[str, bool]], aliases: dict[str, str], seen: dict[int, str]) -> None:
    """Record one named tensor, or the name as an alias of the same tensor met under another name (tied)."""
    if id(tensor) in seen:
        aliases[name] = seen[id(tensor)]
        return
    seen[id(tensor)] = name
    tensors[name] = tensor.detach()
    kinds[name] = kind


def _install(gm: GraphModule, name: str, kind: str, flag: bool, tensor: torch.Tensor) -> torch.Tensor:
    owner_path, _, attr = name.rpartition(".")
    _check_attr(name, attr)
    owner = gm.get_submodule(owner_path)
    if kind == "parameter":
        value = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=flag)
        owner.register_parameter(attr, value)
        return value
    if kind == "buffer":
        owner.register_buffer(attr, tensor, persistent=flag)
    elif kind == "constant":
        if hasattr(owner, attr):
            raise ArtifactError(f"graph payload constant {name!r} would overwrite an attribute of the module")
        setattr(owner, attr, tensor)
    else:
        raise ArtifactError(f"graph payload tensor {name!r} has unknown kind {kind!r}")
    return tensor


def _check_attr(path: str, name: str) -> None:
    if not (name.isidentifier() or name.isdigit()) or keyword.iskeyword(name) or name.startswith("__"):
        raise ArtifactError(f"graph payload names attribute {path!r}; attribute names must be plain identifiers "
                            "or indices")


def _encode_node(node: Node, literals: list[torch.Tensor]) -> tuple[Any, ...]:
    if node.op not in _OPS:
        raise ArtifactError(f"cannot serialise node {node.name!r}: {node.op} nodes are not supported "
                            f"(only {', '.join(_OPS)})")
    target: Any = node.target
    if node.op == "call_function":
        target = _encode_target(node)
    elif node.op == "call_method" and str(target).startswith("_"):
        raise ArtifactError(f"cannot serialise node {node.name!r}: it calls private method {target!r}")
    meta = {}
    for key, value in node.meta.items():
        if key.startswith(_META_PREFIX):
            try:
                meta[key] = _encode(value, literals, allow_nodes=False)
            except ArtifactError as err:
                raise ArtifactError(f"cannot serialise metadata {key!r} of node {node.name!r}: {err}") from None
    try:
        args, kwargs = _encode(node.args, literals), _encode(dict(node.kwargs), literals)
    except ArtifactError as err:
        raise ArtifactError(f"cannot serialise the arguments of node {node.name!r}: {err}") from None
    return node.name, node.op, target, args, kwargs, meta


def _encode_target(node: Node) -> tuple[str, ...]:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target.namespace, target._opname, target._overloadname)
    if isinstance(target, torch._ops.OpOverloadPacket):
        namespace, _, name = target._qualified_op_name.partition("::")
        return ("packet", namespace, name)
    name = _get_qualified_name(target) if callable(target) else repr(target)
    try:
        found = _resolve_callable(name)
    except ArtifactError as err:
        raise ArtifactError(f"cannot serialise node {node.name!r}: {err}") from None
    if found is not target:
        raise ArtifactError(f"cannot serialise node {node.name!r}: its target is not reachable as {name!r}")
    return ("callable", name)


def _decode_target(op: str, target: Any, tensor_names: set[str]) -> Any:
    if op == "call_function":
        if not isinstance(target, tuple) or not target:
            raise ArtifactError(f"graph payload has a malformed call target {target!r}")
        if target[0] == "op" and len(target) == 4:
            return _operator(target[1], target[2], target[3])
        if target[0] == "packet" and len(target) == 3:
            return _operator(target[1], target[2], None)
        if target[0] == "callable" and len(target) == 2:
            return _resolve_callable(str(target[1]))
        raise ArtifactError(f"graph payload has a malformed call target {target!r}")
    if not isinstance(target, str):
        raise ArtifactError(f"graph payload {op} node has a non-string target {target!r}")
    if op == "get_attr" and target not in tensor_names:
        raise ArtifactError(f"graph payload reads attribute {target!r}, which is not one of its tensors")
    if op == "call_method" and (not target.isidentifier() or target.startswith("_")):
        raise ArtifactError(f"graph payload calls method {target!r}; only public methods are allowed")
    return target


def _operator(namespace: str, name: str, overload: str | None) -> Any:
    """``torch.ops.<namespace>.<name>[.<overload>]``, which only ever finds registered operators."""
    if name in _REFUSED:
        raise ArtifactError(f"graph payload calls operator {namespace}::{name}, which touches files; refused")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        op = packet if overload is None else getattr(packet, overload)
    except (AttributeError, RuntimeError) as err:
        raise ArtifactError(f"graph payload calls operator {namespace}::{name}.{overload}, which is not registered "
                            "here (load the library that defines it first)") from err
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        raise ArtifactError(f"graph payload target {namespace}::{name} is not an operator")
    return op


def _resolve_callable(name: str) -> Any:
    """The function ``name`` (``"_operator.getitem"``, ``"torch.sym_float"``) if the allowlist admits it."""
    parts = name.split(".")
    refusal = (f"{name!r} is not an allowed graph function (allowed: torch.ops operators and the tensor-maths "
               f"functions of {', '.join(_ROOTS)}; never {', '.join(sorted(_REFUSED))})")
    if parts[0] not in _ROOTS or any(not p.isidentifier() or p.startswith("__") for p in parts) \
            or parts[-1] in _REFUSED:
        raise ArtifactError(refusal)
    value: Any = importlib.import_module(parts[0])
    for part in parts[1:]:
        value = getattr(value, part, None)
    module = getattr(value, "__module__", None)
    if isinstance(value, type(torch)) or not callable(value):
        raise ArtifactError(refusal)
    if module is None:  # a method descriptor such as torch.Tensor.add
        if parts[:2] != ["torch", "Tensor"] or len(parts) != 3 or parts[2].startswith("_"):
            raise ArtifactError(refusal)
    elif module not in _ROOTS[:4] and module not in _TORCH_MODULES:
        raise ArtifactError(refusal)
    return value


def _encode_codegen(graph: Graph) -> tuple[Any, ...] | None:
    codegen = graph._codegen
    if type(codegen) is CodeGen:
        return None
    if type(codegen) is not _PyTreeCodeGen:
        raise ArtifactError(f"cannot serialise a graph with code generator {type(codegen).__name__}")
    info = codegen.pytree_info
    try:
        specs = [None if s is None else pytree.treespec_dumps(s) for s in (info.in_spec, info.out_spec)]
    except Exception as err:  # treespec_dumps raises for container types registered without a serialized name
        raise ArtifactError(f"cannot serialise the graph's input/output structure: {err}. Register the output "
                            "type with torch.utils._pytree.register_pytree_node(..., serialized_type_name=...)") from err
    return ("pytree", list(info.orig_args), specs[0], specs[1])


def _decode_codegen(record: Any) -> CodeGen:
    if record is None:
        return CodeGen()
    if not (isinstance(record, tuple) and len(record) == 4 and record[0] == "pytree"):
        raise ArtifactError(f"graph payload has a malformed code generator record {record!r}")
    try:
        in_spec, out_spec = (None if s is None else pytree.treespec_loads(s) for s in record[2:])
    except Exception as err:  # an unknown serialized type name: its library is not imported here
        raise ArtifactError(f"the graph's input/output structure names a type not registered with torch's pytree "
                            f"here ({err}); import the library that defines it (e.g. transformers) first") from err
    return _PyTreeCodeGen(_PyTreeInfo(list(record[1]), in_spec, out_spec))


def _encode(value: Any, literals: list[torch.Tensor], *, allow_nodes: bool = True) -> Any:
    """``value`` as primitives and tagged tuples: every tuple in the payload starts with its tag."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, Node):
        if not allow_nodes:
            raise ArtifactError(f"node {value.name!r} where only plain values are allowed")
        return ("node", value.name)
    if type(value) is tuple or isinstance(value, torch.Size):
        return ("size" if isinstance(value, torch.Size) else "tuple",
                [_encode(v, literals, allow_nodes=allow_nodes) for v in value])
    if isinstance(value, list):  # fx's immutable_list too: create_node makes lists immutable again
        return ("list", [_encode(v, literals, allow_nodes=allow_nodes) for v in value])
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise ArtifactError(f"dict with non-string keys {list(value)[:4]}")
        return ("dict", [(k, _encode(v, literals, allow_nodes=allow_nodes)) for k, v in value.items()])
    for tag, kind in _TORCH_ENUMS.items():
        if isinstance(value, kind):
            return (tag, str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return ("device", str(value))
    if isinstance(value, slice):
        return ("slice", [_encode(v, literals, allow_nodes=allow_nodes) for v in (value.start, value.stop, value.step)])
    if value is Ellipsis:
        return ("ellipsis",)
    if type(value) is complex:
        return ("complex", value.real, value.imag)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        literals.append(value.detach())
        return ("tensor", len(literals) - 1)
    raise ArtifactError(f"no serialised form for a {type(value).__name__} ({value!r:.80})")


_TORCH_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


def _decode(value: Any, env: dict[str, Node], literals: list[torch.Tensor]) -> Any:
    if value is None or type(value) in (bool, int, float, str):
        return value
    if not isinstance(value, tuple) or not value or not isinstance(value[0], str):
        raise ArtifactError(f"graph payload has an untagged value {value!r:.80}")
    tag, *rest = value
    if tag == "node":
        if rest[0] not in env:
            raise ArtifactError(f"graph payload refers to node {rest[0]!r} before defining it")
        return env[rest[0]]
    if tag in ("tuple", "size", "list"):
        items = [_decode(v, env, literals) for v in rest[0]]
        return tuple(items) if tag == "tuple" else torch.Size(items) if tag == "size" else items
    if tag == "dict":
        return {str(k): _decode(v, env, literals) for k, v in rest[0]}
    if tag in _TORCH_ENUMS:
        found = getattr(torch, str(rest[0]), None)
        if not isinstance(found, _TORCH_ENUMS[tag]):
            raise ArtifactError(f"graph payload names unknown {tag} {rest[0]!r}")
        return found
    if tag == "device":
        return torch.device(str(rest[0]))
    if tag == "slice":
        return slice(*(_decode(v, env, literals) for v in rest[0]))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "complex":
        return complex(float(rest[0]), float(rest[1]))
    if tag == "tensor":
        return literals[int(rest[0])]
    raise ArtifactError(f"graph payload has a value with unknown tag {tag!r}")


def _decode_node(graph: Graph, record: Any, env: dict[str, Node], tensor_names: set[str],
                 literals: list[torch.Tensor]) -> None:
    if not (isinstance(record, tuple) and len(record) == 6):
        raise ArtifactError(f"graph payload has a malformed node record {record!r:.80}")
    name, op, target, args, kwargs, meta = record
    if op not in _OPS:
        raise ArtifactError(f"graph payload node {name!r} has op {op!r}; allowed: {', '.join(_OPS)}")
    try:
        target = _decode_target(op, target, tensor_names)
        args, kwargs = _decode(args, env, literals), _decode(kwargs, env, literals)
    except ArtifactError as err:
        raise ArtifactError(f"graph payload node {name!r}: {err}") from None
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise ArtifactError(f"graph payload node {name!r} has malformed arguments")
    node = graph.create_node(op, target, args, kwargs, name=str(name))
    if node.name != name:
        raise ArtifactError(f"graph payload node name {name!r} is not a valid unique node name")
    node.meta = {str(k): _decode(v, {}, literals) for k, v in meta.items()}
    env[name] = node
