"""Trace an export graph module to ONNX, then finish it: float16 weights, metadata, external data.

Weights never need to sit in memory twice: a graph over protobuf's 2 GB limit (any real vision-language model) is
written by the exporter with its weights in files beside it, loaded without them, and `save` copies them into the
bundle's one weights file tensor by tensor (the graph under 2 GB keeps them inline until then, as before).

The contract (declared here and in savpack_runtime.graph_inputs, documented in docs/export.md):
- inputs: graph_inputs.GRAPH_INPUTS[kind], in that order, with their dynamic axes;
- outputs: `head_vectors` (batch, k, head_dim) float32, then each pack's vote (graph_inputs.score_outputs);
- opset 18 (OPSET): the newest opset both torch exporters emit (the TorchScript exporter stops at 20, the dynamo
  exporter starts at 18) that every onnxruntime the runtime accepts (>= 1.18) runs. Attention is plain MatMul and
  Softmax, so nothing newer (opset 23's Attention) is needed;
- only the standard operator domain (savpack_runtime.session.STANDARD_DOMAINS).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from savpack_runtime import graph_inputs
from savpack_runtime.bundle import GRAPH_DATA_FILE
from savpack_runtime.session import STANDARD_DOMAINS

from ..errors import ExportError
from .forward import GraphModule

OPSET = 18
# torchscript: traces the module (about 2 s for a tiny model here); dynamo: torch.export, the exporter torch now
# develops (50-100 s for the same model on this machine). Both gave graphs equal to the model to 1.3e-7; every graph
# is validated against the real model whichever exporter made it (docs/decisions.md).
EXPORTERS = ("torchscript", "dynamo")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def trace_to_onnx(graph: GraphModule, feed: dict[str, np.ndarray], folder: Path, exporter: str = "torchscript"):
    """The graph module traced on the example `feed` (a planned batch), as an onnx ModelProto.

    The exporter writes into `folder`, which must outlive the ModelProto until `save`: weights the exporter stored
    as external data (graphs over 2 GB; the dynamo exporter always) stay in its files, not in memory."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    # torch.onnx.export restores the module's training flag afterwards, recursively: a wrapper left in training mode
    # would switch the loaded model's dropout on (BERT's) for every later forward.
    graph.module.eval()
    names = list(graph.input_names)
    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[name])) for name in names)
    axes = {name: dict(graph_inputs.GRAPH_INPUTS[graph.kind][name]) for name in names}
    path = Path(folder) / "traced.onnx"
    with _quiet_exporter():
        try:
            with torch.no_grad():
                if exporter == "torchscript":
                    outputs = {name: graph_inputs.OUTPUT_AXES for name in graph.output_names}
                    torch.onnx.export(graph.module, args, str(path), input_names=names,
                                      output_names=list(graph.output_names), dynamic_axes={**axes, **outputs},
                                      opset_version=OPSET, dynamo=False, do_constant_folding=True)
                else:
                    # Positional, in the forward's signature: a scored graph's forward takes *inputs, one parameter
                    # holding them all (torch.export matches dynamic_shapes to parameters, not to arguments).
                    shapes = tuple({axis: torch.export.Dim.AUTO for axis in axes[name]} for name in names)
                    if _takes_varargs(graph.module):
                        shapes = (shapes,)
                    torch.onnx.export(graph.module, args, str(path), input_names=names,
                                      output_names=list(graph.output_names), dynamic_shapes=shapes,
                                      opset_version=OPSET, dynamo=True, external_data=True, verbose=False)
        except Exception as exc:  # the exporters raise many types; the message is what the user needs
            raise ExportError(f"torch.onnx.export ({exporter}) failed: {str(exc).strip().splitlines()[0]}") from exc
    model = onnx.load(str(path), load_external_data=False)
    _rename_dims(model, graph.kind)
    return model


def _takes_varargs(module: torch.nn.Module) -> bool:
    return any(parameter.kind is inspect.Parameter.VAR_POSITIONAL
               for parameter in inspect.signature(module.forward).parameters.values())


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters print progress and warn about the legacy path and negative indices (the plan has none)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _rename_dims(model, kind: str) -> None:
    """Name every dynamic axis as the contract does (the dynamo exporter invents names like s43)."""
    axes = graph_inputs.GRAPH_INPUTS[kind]
    for value in model.graph.input:
        for axis, label in axes.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = label
    for value in model.graph.output:
        for axis, label in graph_inputs.OUTPUT_AXES.items():
            value.type.tensor_type.shape.dim[axis].dim_param = label


def float16_weights(model, folder: Path) -> int:
    """Store every float32 weight matrix (rank >= 2) as float16, cast back to float32 where the graph reads it.

    Activations stay float32 (a fully float16 graph is slower on CPUs and did not load in onnxruntime). Vectors
    (norm scales, biases) stay float32: they are tiny and precision-sensitive. `folder`: where trace_to_onnx wrote
    the graph (external weights are read from there). Returns the bytes saved.
    """
    from onnx import TensorProto, helper, numpy_helper

    casts, saved = [], 0
    scoring = scoring_initializers(model)
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 2 or tensor.name in scoring:
            continue
        name, values = tensor.name, numpy_helper.to_array(tensor, base_dir=str(folder))
        largest = float(np.abs(values).max(initial=0.0))
        if largest > FLOAT16_MAX:
            raise ExportError(f"weight {name!r} holds {largest:g}, beyond float16's range; export without --fp16")
        half_name = f"{name}__float16"
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values.astype(np.float16), half_name))
        casts.append(helper.make_node("Cast", [half_name], [name], to=TensorProto.FLOAT, name=f"{half_name}__cast"))
        saved += values.nbytes // 2
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)
    return saved


def scoring_nodes(model) -> list[str]:
    """Names of the nodes that compute the packs' votes (savpack.export.scores: the `scores` submodule)."""
    from .scores import SCORES_MODULE

    return [node.name for node in model.graph.node if node.name.startswith((f"/{SCORES_MODULE}.", f"/{SCORES_MODULE}/"))]


def scoring_initializers(model) -> set[str]:
    """Initializers read only by the scoring nodes (the unit centroids, unless the exporter made them Constant nodes):
    kept in float32 by every conversion."""
    scoring = set(scoring_nodes(model))
    readers: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name in scoring)
    initializers = {tensor.name for tensor in model.graph.initializer}
    return {name for name, kinds in readers.items() if kinds == {True} and name in initializers}


def finish(model, metadata: dict[str, str]) -> None:
    """Set the metadata_props and refuse operators outside the standard domain (`save` runs onnx's checker on the
    written file: serialising a graph over 2 GB in memory, as checking a ModelProto does, fails)."""
    import onnx

    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    foreign = [opset.domain for opset in model.opset_import if opset.domain not in STANDARD_DOMAINS]
    if foreign or len(model.functions):
        raise ExportError(f"the exported graph uses operator domains {foreign} / {len(model.functions)} functions; "
                          "savpack graphs must use the standard ONNX operators only")


# Tensors below this many bytes stay inside graph.onnx: shape constants must (onnxruntime's shape inference cannot read
# them from external data: "Cannot parse data from external tensors"), and they weigh nothing.
INLINE_BYTES = 1024
_COPY_BLOCK = 64 << 20


def _inline_attribute_tensors(model, folder: Path) -> None:
    """Tensors held by node attributes (Constant values) inside the graph file: a tool that saved them as external
    data (onnxruntime's quantizer does) would otherwise leave them pointing at its own weights file."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    for node in model.graph.node:
        for attribute in node.attribute:
            for tensor in [attribute.t] if attribute.HasField("t") else list(attribute.tensors):
                if uses_external_data(tensor):
                    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                    del tensor.external_data[:]
                    tensor.ClearField("data_location")


def save(model, path: Path, folder: Path) -> None:
    """graph.onnx with its weights in one external file (GRAPH_DATA_FILE) beside it, then onnx's checker on the file.

    Writes what onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=INLINE_BYTES)
    writes (same bytes: initializers in order, back to back), but copies weights the exporter left in files of
    `folder` one block at a time instead of loading them all."""
    import onnx
    from onnx import TensorProto
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    data_path = path.parent / GRAPH_DATA_FILE
    _inline_attribute_tensors(model, Path(folder))
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                source = Path(folder) / info.location
                length = info.length if info.length is not None else source.stat().st_size - (info.offset or 0)
                if sys.getsizeof(b"") + length < INLINE_BYTES:  # measured as onnx measures raw_data
                    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                    del tensor.external_data[:]
                    tensor.ClearField("data_location")  # as if it had never left: the same bytes
                    continue
                offset = data.tell()
                with open(source, "rb") as handle:
                    handle.seek(info.offset or 0)
                    remaining = length
                    while remaining:
                        block = handle.read(min(remaining, _COPY_BLOCK))
                        if not block:
                            raise ExportError(f"{source}: the exporter's weights file ends early (tensor {tensor.name!r})")
                        data.write(block)
                        remaining -= len(block)
            elif tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= INLINE_BYTES:
                offset = data.tell()
                data.write(tensor.raw_data)
                length = len(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", GRAPH_DATA_FILE), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {str(exc).splitlines()[0]}") from None
