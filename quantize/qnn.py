"""The QNN execution provider's HTP backend (onnxruntime-qnn, a simulator on x86): availability, sessions, coverage.

Coverage comes from onnxruntime itself: `session.record_ep_graph_assignment_info` says which node
went to which provider, and the QNN EP's verbose log (severity 0, captured from stderr while the
session is made) says why each refused node was refused. Sessions for coverage run basic graph
optimizations only (those that precede partitioning in any session), so the nodes are the file's
own less what was constant-folded, plus the DequantizeLinear copies onnxruntime makes (`.../duplicated`).
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from smolvlm_edge.runtime.errors import ProviderError
from smolvlm_edge.runtime.providers import QNN_EP, make_qnn_htp_session, register_qnn

# What every HTP session is told; every key is a QNN EP provider option (strings). On the x86 simulator
# the default target could not finalize a static 135M decoder (QNN_COMMON_ERROR_MEM_ALLOC) until a
# newer target was named: {"htp_arch": "75", "soc_model": "57"} (Snapdragon 8 Gen 3). The full-frame
# vision encoder needs neither. A device detects its own SoC, so none is named by default.
DEFAULT_HTP_OPTIONS: dict[str, str] = {"htp_performance_mode": "burst"}

_VALIDATION = re.compile(r"Validation (PASSED|FAILED) for \d+ nodes in OrtNodeUnit \((\w+)\)")
_NODE = re.compile(r"^\s*Operator type: (\S+) Node name: (.*?) Node index: \d+")
_REASON = re.compile(r"^\s*REASON : (.*)")


def qnn_available() -> tuple[bool, str]:
    """Whether a QNN HTP session can be made here, and why (not)."""
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        return False, f"onnxruntime-qnn is not installed ({exc}); `pip install onnxruntime-qnn`"
    try:
        backend = register_qnn()
    except ProviderError as exc:
        return False, str(exc)
    if not Path(backend).is_file():
        return False, f"onnxruntime-qnn {onnxruntime_qnn.__version__} has no HTP backend at {backend}"
    qnn = getattr(onnxruntime_qnn.build_and_package_info, "qnn_version", "?")
    return True, f"onnxruntime-qnn {onnxruntime_qnn.__version__} (QNN SDK {qnn}), HTP backend {backend}"


def make_qnn_session(path: str | Path, *, fallback: bool = False, htp_options: dict | None = None,
                     session_options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A session on the HTP backend; `fallback=False` (the default) refuses a graph HTP does not take whole."""
    options = {**DEFAULT_HTP_OPTIONS, **(htp_options or {})}
    return make_qnn_htp_session(Path(path), fallback=fallback, options=options, session_options=session_options)


@contextlib.contextmanager
def _stderr_into(file: Path):
    """Send file descriptor 2 (where onnxruntime's C++ logger writes) into `file` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def parse_validation_log(lines) -> dict[str, dict]:
    """The QNN EP's per-node verdicts from its verbose log: {node name: {op_type, passed, reason}}.

    GetCapability runs twice (before and after the layout transform); the last verdict wins.
    """
    verdicts: dict[str, dict] = {}
    block: list[tuple[str, str]] = []
    passed = False
    for line in lines:
        head = _VALIDATION.search(line)
        if head:
            block, passed = [], head.group(1) == "PASSED"
            continue
        node = _NODE.match(line)
        if node:
            block.append((node.group(1), node.group(2)))
            verdicts[node.group(2)] = {"op_type": node.group(1), "passed": passed, "reason": None}
            continue
        reason = _REASON.match(line)
        if reason:
            for _, name in block:
                verdicts[name]["reason"] = reason.group(1).strip()
    return verdicts


def htp_coverage(path: str | Path, *, htp_options: dict | None = None, dims: dict[str, int] | None = None) -> dict:
    """Which nodes and op types the HTP backend takes and which it leaves to the CPU, with the EP's reasons.

    The session is made with CPU fallback allowed, so a partly supported graph still yields its split.
    If even that session fails (the HTP graph does not finalize, say), `error` holds the message and
    the split comes from the EP's validation log alone (`source` says which). `dims` fixes named dynamic
    axes for the session (onnxruntime's free-dimension overrides), e.g. the runtime's `decode_step_dims`.
    """
    register_qnn()
    so = ort.SessionOptions()
    for dim, size in (dims or {}).items():
        so.add_free_dimension_override_by_name(dim, size)
    so.log_severity_level = 0  # the QNN EP's per-node validation verdicts are VERBOSE messages
    # Basic optimizations (constant folding of shape logic, say) run before partitioning in every
    # session, so they count; later levels only touch what the CPU got and would rename op types.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    error, assignment = None, None
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ort.log"
        with _stderr_into(log):
            try:
                # I/O quantization on HTP, as a session without fallback has it (the default offloads it to the CPU).
                options = {"offload_graph_io_quantization": "0", **(htp_options or {})}
                session = make_qnn_session(path, fallback=True, htp_options=options, session_options=so)
                assignment = session.get_provider_graph_assignment_info()
                del session
            except ProviderError as exc:
                error = str(exc)
        with open(log, errors="replace") as fh:  # tens of MB for a full-size graph: read it line by line
            verdicts = parse_validation_log(fh)
    if assignment is not None:
        placed = [(sub.ep_name, node.op_type, node.name) for sub in assignment for node in sub.get_nodes()]
        partitions = sum(1 for sub in assignment if sub.ep_name == QNN_EP)
        source = "assignment"
    else:
        placed = [(QNN_EP if v["passed"] else "CPUExecutionProvider", v["op_type"], name)
                  for name, v in verdicts.items()]
        partitions = None
        source = "validation log"
    taken = collections.Counter(op for ep, op, _ in placed if ep == QNN_EP)
    refused = collections.Counter(op for ep, op, _ in placed if ep != QNN_EP)
    reasons: dict[str, list[str]] = {}
    for ep, op, name in placed:
        reason = verdicts.get(name, {}).get("reason")
        if ep != QNN_EP and reason and reason not in reasons.setdefault(op, []):
            reasons[op].append(reason)
    total = len(placed)
    return {
        "nodes": total,
        "htp_nodes": sum(taken.values()),
        "htp_fraction": round(sum(taken.values()) / total, 4) if total else 0.0,
        "htp_partitions": partitions,
        "taken": dict(taken.most_common()),
        "refused": dict(refused.most_common()),
        "refused_reasons": reasons,
        "source": source,
        "error": error,
    }


def session_split(session: ort.InferenceSession) -> dict[str, dict[str, int]]:
    """Nodes per execution provider and op type of a live session: {ep: {op_type: count}}.

    Empty unless the session was made with `session.record_ep_graph_assignment_info` (the runtime's
    decoder on HTP is)."""
    split: dict[str, collections.Counter] = {}
    for sub in session.get_provider_graph_assignment_info():
        split.setdefault(sub.ep_name, collections.Counter()).update(node.op_type for node in sub.get_nodes())
    return {ep: dict(ops.most_common()) for ep, ops in split.items()}


FP16_MAX = 65504.0


def fp16_square_overflow(path: str | Path) -> dict:
    """Float `Pow(x, 2)` nodes (the RMSNorm statistics the qdq recipe keeps float) whose calibrated input range
    squared exceeds fp16: HTP computes float nodes in fp16, so x^2 becomes inf there (the CPU computes fp32).

    The range is read from the DequantizeLinear feeding the node (scale x the farthest code from the zero point).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}

    def value(name):
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    squares, over, worst = 0, 0, 0.0
    for node in model.graph.node:
        source = producer.get(node.input[0]) if node.op_type == "Pow" else None
        exponent = value(node.input[1]) if node.op_type == "Pow" else None
        if exponent is None or float(exponent) != 2.0 or source is None or source.op_type != "DequantizeLinear":
            continue
        scale, zero = value(source.input[1]), value(source.input[2])
        if scale is None or zero is None:
            continue
        codes = np.iinfo(zero.dtype)
        reach = float(scale) * max(codes.max - float(zero), float(zero) - codes.min)
        squares += 1
        over += reach * reach > FP16_MAX
        worst = max(worst, reach)
    return {"float_squares": squares, "overflow_in_fp16": over, "largest_input_range": round(worst, 1)}
