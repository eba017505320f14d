"""Graph specs (names, dtypes, shapes) and the one routine that turns a wrapper module into an .onnx file."""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolvlm_edge.runtime.errors import ExportError

# Exports target what phone apps ship: onnxruntime 1.31 refuses IR 14 (onnx 1.23's default).
DEFAULT_OPSET = 18
DEFAULT_IR_VERSION = 9
# Protobuf cannot hold a model of 2 GiB or more: above this many weight bytes, use external data.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2**31

Dim = str | int  # a named dynamic axis or a fixed size


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its contract name, numpy dtype name and declared shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """What a graph is: its file stem and its inputs and outputs, in order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def torch_dims(self) -> dict[str, dict[int, Any]]:
        """Per input, its dynamic axes as `torch.export.Dim`s; one Dim object per axis name."""
        from torch.export import Dim as TorchDim

        dims: dict[str, Any] = {}
        result = {}
        for spec in self.inputs:
            axes = {}
            for i, d in enumerate(spec.shape):
                if isinstance(d, str):
                    axes[i] = dims.setdefault(d, TorchDim(d))
            result[spec.name] = axes
        return result

    def to_json(self, file: str, external_data: str | None) -> dict[str, Any]:
        return {
            "file": file,
            "external_data": external_data,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


@dataclass(frozen=True)
class WrittenGraph:
    """An exported graph on disk: where it is and how long the export took."""

    spec: GraphSpec
    path: Path
    external_data: Path | None
    seconds: float
    info: dict | None = None  # what an exporter did beyond tracing (the vision fusions), for the manifest


def load_with_weights(path: Path):
    """onnx.load of a graph and the weights beside it. onnx refuses to read a weight file with more than one
    hard link (a guard against link attacks; `cp -al` copies make them): say that and what to do, naming the
    graph, instead of onnx's checker trace."""
    import onnx

    try:
        return onnx.load(str(path))
    except onnx.checker.ValidationError as exc:
        if "hard link" not in str(exc):
            raise
        from smolvlm_edge.runtime.errors import BundleError

        raise BundleError(f"{path}: onnx will not read weights from a file with several hard links ({exc}); copy "
                          "the bundle without hard links (cp -r, not cp -al) and try again") from exc


def use_ms_domain(model) -> None:
    """Declare the com.microsoft opset (onnxruntime's contrib ops) in an onnx ModelProto, once."""
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


_IR_DTYPES = {"float32": "FLOAT", "int64": "INT64", "bool": "BOOL"}


def export_graph(
    module,
    args: tuple,
    spec: GraphSpec,
    dynamic_shapes: tuple | dict,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    ir_version: int = DEFAULT_IR_VERSION,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    edit: Callable[[Any], None] | None = None,
    traced_input_names: Sequence[str] | None = None,
) -> WrittenGraph:
    """Export `module(*args)` with the dynamo exporter, apply `edit` to the IR model, and save it.

    `traced_input_names` name the module's inputs when `edit` replaces them (default: the spec's).
    The declared I/O shapes are then set from `spec`, so the file says exactly what the contract says.
    """
    import onnx_ir as ir
    import torch

    start = time.perf_counter()
    module.eval()
    # torch's exporter logs one line per torchvision op it skips; torchvision is not needed here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        # Harmless: the exporter names axes itself and says so per shared Dim; _declare_io names them below.
        warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(traced_input_names or spec.input_names),
                output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                # onnxscript's optimizer folds constants and drops dead ops; verify.py checks its numerics.
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; keep its message, name the graph
            raise ExportError(f"torch.onnx.export failed for {spec.name}: {type(exc).__name__}: {exc}") from exc
    model = program.model
    if edit is not None:
        edit(model)
    _declare_io(model, spec)
    _pin_versions(model, spec.name, opset, ir_version)

    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value is not None)
    external = path.with_suffix(".onnx_data") if weight_bytes > external_data_threshold else None
    ir.save(model, path, external_data=external.name if external else None)
    _check_file(path, spec.name)
    return WrittenGraph(spec, path, external, time.perf_counter() - start)


def _declare_io(model, spec: GraphSpec) -> None:
    """Give graph inputs/outputs the contract's names, dtypes and shapes (named axes as dim_params)."""
    import onnx_ir as ir

    for values, specs, kind in ((model.graph.inputs, spec.inputs, "inputs"), (model.graph.outputs, spec.outputs, "outputs")):
        names = [v.name for v in values]
        if names != [t.name for t in specs]:
            raise ExportError(f"{spec.name}: exported {kind} {names} differ from the contract {[t.name for t in specs]}")
        for value, t in zip(values, specs):
            if value.dtype != getattr(ir.DataType, _IR_DTYPES[t.dtype]):
                raise ExportError(f"{spec.name}: {t.name} is {value.dtype}, the contract says {t.dtype}")
            if value.shape is not None:
                for axis, (got, want) in enumerate(zip(value.shape, t.shape)):
                    if isinstance(want, int) and isinstance(got, int) and got != want:
                        raise ExportError(f"{spec.name}: {t.name} axis {axis} is {got}, the contract says {want}")
            value.shape = ir.Shape(list(t.shape))


def _pin_versions(model, name: str, opset: int, ir_version: int) -> None:
    """Set the IR version on purpose and refuse any op domain newer than the requested opset."""
    got = model.opset_imports.get("", opset)
    if got > opset:
        raise ExportError(f"{name}: the exporter needed opset {got}, above the requested {opset}")
    model.opset_imports[""] = opset
    model.ir_version = ir_version


def _check_file(path: Path, name: str) -> None:
    """Run the ONNX checker on the written file (by path, so external data of any size works)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{name}: the written graph {path} fails the ONNX checker: {exc}") from exc
