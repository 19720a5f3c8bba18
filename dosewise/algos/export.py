"""A trained IQL policy and its critics as one self-contained ONNX or TorchScript file.

Teams that serve models with onnxruntime, Triton or libtorch get a graph that takes raw states
in clinical units: the normaliser, the mean over ensemble members and the clip to the action
bounds are part of it, so its answers equal `TrainedIQL.policy_action`, ``q_value`` and
``value`` and nothing has to be re-implemented next to it. Every export is loaded back and
compared with the PyTorch model on a probe batch spread over the training range (at several batch
sizes, so a batch dimension fixed by mistake is caught); an export that disagrees is removed.
A sidecar ``<file>.json`` says what the inputs are, their units and order, what the outputs mean,
and the SHA-256 of the file it describes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import dosewise
from dosewise.algos.iql import Layers
from dosewise.algos.trained import TrainedIQL
from dosewise.checkpoint import sha256_hex, write_bytes_atomic, write_json_atomic
from dosewise.data.schema import FEATURE_UNITS

EXPORT_FORMATS = ("onnx", "torchscript")
SIDECAR_FORMAT = "dosewise.export/1"
INPUT_NAMES = ("state", "action")
OUTPUT_NAMES = ("policy_action", "q_value", "value")
ACTION_MEANING = "normalised dose change, -1 lower .. +1 raise"
TOLERANCE = 1e-4  # largest |export - PyTorch| the check accepts on any output
PROBE_SIZE = 64  # states in the check's probe batch
PROBE_BATCH_SIZES = (PROBE_SIZE, 1, 37)  # the check runs the file at each: the batch dimension must stay free
EXPORT_EXTRA = "pip install 'dosewise[export]'"


class ExportError(ValueError):
    """An export that cannot be made or does not reproduce the model: bad format or path, missing extra, failed check."""


class _StackedMLP(nn.Module):
    """E MLPs stacked on a leading axis, as in `dosewise.algos.iql.stacked_mlp`: x [E, N, in] -> [E, N, out]."""

    def __init__(self, layers: Layers):
        super().__init__()
        copies = [(weight.detach().clone(), bias.detach().clone()) for weight, bias in layers]
        self.hidden = nn.ModuleList([_Layer(weight, bias) for weight, bias in copies[:-1]])
        self.last = _Layer(*copies[-1])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.last(x)


class _Layer(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # [E, in, out]
        self.register_buffer("bias", bias)  # [E, 1, out]

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class ExportedPolicy(nn.Module):
    """The whole inference path of a `TrainedIQL` as one module of plain tensor ops.

    forward(state [N, D] float32 in raw clinical units, columns in ``feature_names`` order,
    action [N, 1] float32) -> (policy_action [N], q_value [N], value [N]): the members' mean of the
    clipped policy mean, of the smaller twin critic at ``action``, and of V.
    """

    def __init__(self, model: TrainedIQL):
        super().__init__()
        nets = model.nets
        self.members = model.members
        self.action_low, self.action_high = model.action_low, model.action_high
        self.register_buffer("mean", torch.as_tensor(model.normalizer.mean, dtype=torch.float32).clone())  # [D]
        self.register_buffer("std", torch.as_tensor(model.normalizer.std, dtype=torch.float32).clone())  # [D]
        self.pi = _StackedMLP(nets.layers("pi"))  # [K, ...] -> mu, log_std
        self.q = _StackedMLP(nets.layers("q"))  # [2K, ...]: member k's twins are rows 2k, 2k + 1
        self.v = _StackedMLP(nets.layers("v"))  # [K, ...]

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = (state - self.mean) / self.std  # [N, D]
        n = s.shape[0]
        per_member = s.unsqueeze(0).expand(self.members, n, s.shape[1])  # [K, N, D]
        mu = self.pi(per_member)[:, :, 0]  # [K, N]; channel 1 is log_std, unused by the mean
        policy_action = torch.tanh(mu).clamp(self.action_low, self.action_high).mean(0)
        sa = torch.cat([s, action], dim=1)  # [N, D + 1]
        twins = self.q(sa.unsqueeze(0).expand(2 * self.members, n, sa.shape[1]))  # [2K, N, 1]
        q_value = twins.reshape(self.members, 2, n).amin(dim=1).mean(0)
        value = self.v(per_member)[:, :, 0].mean(0)
        return policy_action, q_value, value


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the exported file
    format: str  # one of EXPORT_FORMATS
    feature_names: tuple[str, ...]  # the columns of the "state" input, in order
    members: int  # ensemble members averaged inside the graph (1: a single model)
    max_abs_diff: dict[str, float]  # per output, |file - PyTorch| on the probe batch; empty when not checked
    sidecar: Path  # <path>.json describing the file


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def export_iql(model: TrainedIQL | str | Path, out: str | Path, fmt: str, *, check: bool = True, opset: int = 18) -> ExportResult:
    """Write ``model`` (a TrainedIQL, a run directory or a model.pt) to ``out`` as ``fmt`` and its sidecar.

    With ``check`` the written file is loaded back and run on a probe batch; if any output differs
    from the PyTorch model by more than TOLERANCE, the file is removed and ExportError raised."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a directory; give the file to write, e.g. {out / ('policy' + _SUFFIX[fmt])}")
    if fmt == "onnx":
        _require_onnx(runtime=check)
    source = None if isinstance(model, TrainedIQL) else str(model)
    trained = model if isinstance(model, TrainedIQL) else TrainedIQL.load(model)
    module = ExportedPolicy(trained).eval()

    try:
        data = _onnx_bytes(module, len(trained.feature_names), opset) if fmt == "onnx" else _torchscript_bytes(module)
    except Exception as err:  # the exporters raise many types; the caller needs one, naming the cause
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{out}: the {fmt} exporter failed ({type(err).__name__}: {reason[:300]}); nothing was written") from err
    write_bytes_atomic(out, data)
    sidecar = sidecar_path(out)
    diffs: dict[str, float] = {}
    if check:
        try:
            diffs = _check(_LOADERS[fmt](out), trained)
        except BaseException:
            _remove(out, sidecar)
            raise
        if max(diffs.values()) > TOLERANCE:
            _remove(out, sidecar)
            shown = ", ".join(f"{name} {diff:.3g}" for name, diff in diffs.items())
            raise ExportError(
                f"{out}: the {fmt} export does not reproduce the model (largest |difference| {shown}; "
                f"at most {TOLERANCE:g} allowed); the file was removed"
            )
    write_json_atomic(_sidecar(trained, fmt, out.name, data, diffs, source, opset if fmt == "onnx" else None), sidecar)
    return ExportResult(
        path=out, format=fmt, feature_names=trained.feature_names, members=trained.members, max_abs_diff=diffs, sidecar=sidecar
    )


_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def _require_onnx(runtime: bool) -> None:
    """The exporter needs onnx and onnxscript, the check onnxruntime: all three are the export extra."""
    names = ["onnx", "onnxscript"] + (["onnxruntime"] if runtime else [])
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"ONNX export needs the export extra ({name} is not installed): {EXPORT_EXTRA}") from None


def _example_inputs(features: int, n: int = 2) -> tuple[Tensor, Tensor]:
    """Inputs to trace with. Two rows, not one: a batch of 1 would be specialised into the graph."""
    return torch.zeros(n, features), torch.zeros(n, 1)


def _onnx_bytes(module: ExportedPolicy, features: int, opset: int) -> bytes:
    batch = torch.export.Dim("N")
    with _quiet():
        program = torch.onnx.export(
            module,
            _example_inputs(features),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_shapes={"state": {0: batch}, "action": {0: batch}},
            verbose=False,
        )
    return program.model_proto.SerializeToString()


def _torchscript_bytes(module: ExportedPolicy) -> bytes:
    """Scripted, not traced: no Python control flow is frozen and the batch dimension stays free."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


Runner = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _load_onnx(path: Path) -> Runner:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda state, action: tuple(session.run(list(OUTPUT_NAMES), {"state": state, "action": action}))


def _load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")

    @torch.no_grad()
    def run(state: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.numpy() for t in loaded(torch.from_numpy(state), torch.from_numpy(action)))

    return run


_LOADERS: dict[str, Callable[[Path], Runner]] = {"onnx": _load_onnx, "torchscript": _load_torchscript}


def probe_batch(model: TrainedIQL, n: int = PROBE_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """States [n, D] spread over the training range of each feature (both ends included) and actions [n, 1] over the bounds."""
    rng = np.random.default_rng(seed)
    lo = np.array([model.feature_ranges[name][0] for name in model.feature_names], dtype=np.float64)
    hi = np.array([model.feature_ranges[name][1] for name in model.feature_names], dtype=np.float64)
    fraction = rng.uniform(size=(n, len(lo)))
    fraction[0], fraction[-1] = 0.0, 1.0
    states = (lo + fraction * (hi - lo)).astype(np.float32)
    actions = rng.uniform(model.action_low, model.action_high, size=(n, 1)).astype(np.float32)
    actions[0], actions[-1] = model.action_low, model.action_high
    return states, actions


def _check(run: Runner, model: TrainedIQL) -> dict[str, float]:
    """Largest |file - PyTorch| per output over the probe batch, run whole and in slices of other batch sizes."""
    states, actions = probe_batch(model)
    diffs = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for n in PROBE_BATCH_SIZES:
        s, a = states[:n], actions[:n]
        expected = (model.policy_action(s), model.q_value(s, a), model.value(s))
        for name, got, want in zip(OUTPUT_NAMES, run(s, a), expected):
            if np.shape(got) != want.shape:
                raise ExportError(f"the exported {name} has shape {np.shape(got)} for a batch of {n}; expected {want.shape}")
            diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))
            diffs[name] = max(diffs[name], diff if np.isfinite(diff) else float("inf"))
    return diffs


def _sidecar(
    model: TrainedIQL, fmt: str, file_name: str, data: bytes, diffs: dict[str, float], source: str | None, opset: int | None
) -> dict:
    d = len(model.feature_names)
    return {
        "schema": SIDECAR_FORMAT,
        "format": fmt,
        "file": file_name,
        "sha256": sha256_hex(data),
        "bytes": len(data),
        "opset": opset,
        "feature_names": list(model.feature_names),
        "units": {name: FEATURE_UNITS.get(name) for name in model.feature_names},
        "feature_ranges": {name: list(model.feature_ranges[name]) for name in model.feature_names},
        "action": {"low": model.action_low, "high": model.action_high, "meaning": ACTION_MEANING},
        "members": model.members,
        "seeds": list(model.seeds),
        "source": {"run": source, "step": model.step},
        "inputs": [
            {
                "name": "state",
                "dtype": "float32",
                "shape": ["N", d],
                "meaning": "raw states in clinical units, columns in feature_names order",
            },
            {"name": "action", "dtype": "float32", "shape": ["N", 1], "meaning": f"the dose change whose Q is asked ({ACTION_MEANING})"},
        ],
        "outputs": [
            {
                "name": "policy_action",
                "dtype": "float32",
                "shape": ["N"],
                "meaning": "the recommendation: the policy mean, clipped to the action bounds",
            },
            {"name": "q_value", "dtype": "float32", "shape": ["N"], "meaning": "Q(state, action), the smaller twin critic"},
            {"name": "value", "dtype": "float32", "shape": ["N"], "meaning": "V(state)"},
        ],
        "ensemble": "every output is the mean over members" if model.members > 1 else "a single model",
        "max_abs_diff": diffs or None,
        "check_tolerance": TOLERANCE if diffs else None,
        "dosewise_version": dosewise.__version__,
        "torch_version": torch.__version__,
    }


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet():
    """The ONNX exporter warns about its own internals (deprecations, a missing torchvision); none concern the caller."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)
