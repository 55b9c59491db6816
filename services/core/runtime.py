"""onnxruntime sessions: provider choice, explicit threading, warm-up and batch-first predict."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from services.core.errors import ModelLoadError
from services.core.manifest import NUMPY_DTYPES, TensorSpec
from services.core.repository import ModelVersion

log = logging.getLogger(__name__)

# onnxruntime may look up its telemetry endpoint from a running service; a model server sends
# nothing anywhere but its replies.
if hasattr(ort, "disable_telemetry_events"):
    ort.disable_telemetry_events()


def choose_providers(requested: Iterable[str]) -> list[str]:
    """The requested providers that this onnxruntime build offers, in order; CPU as the last resort."""
    available = set(ort.get_available_providers())
    chosen = []
    for provider in requested:
        if provider in available:
            chosen.append(provider)
        else:
            log.warning(
                "execution provider %s is not available here (have %s); skipping it", provider, sorted(available)
            )
    if "CPUExecutionProvider" not in chosen:
        if not chosen:
            log.warning("none of the requested providers is available; falling back to CPUExecutionProvider")
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxModel:
    """One model version in an onnxruntime session.

    ``predict`` is synchronous and thread-safe (onnxruntime's Run is); callers on an event loop run
    it in an executor, which the dynamic batcher does.
    """

    def __init__(
        self,
        version: ModelVersion,
        providers: Iterable[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
        allow_spinning: bool = False,
    ) -> None:
        self.version = version
        self.manifest = version.manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        try:
            self.session = ort.InferenceSession(str(version.onnx_path), options, providers=choose_providers(providers))
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"{version.onnx_path}: onnxruntime cannot load it: {exc}") from None
        self.providers: list[str] = self.session.get_providers()
        self._check_signature()
        self.input_names = [spec.name for spec in self.manifest.inputs]
        self.output_names = [spec.name for spec in self.manifest.outputs]
        # onnxruntime's Python ``InferenceSession.run`` checks on every call that each graph input is
        # in the feed, that no OrtValue belongs to another session and that WebGPU graph capture is
        # off, then calls the C++ session's run. The services feed numpy arrays of the manifest's
        # inputs, which are the graph's (_check_signature), and the C++ run refuses a missing one
        # itself; so on the CPU provider predict calls it directly, which saves 7 of the 80 us a
        # LeNet-size call takes on a slow CPU (BENCHMARKS.md). Other providers keep the wrapper
        # for its fallback to the CPU when the provider fails.
        self._run: Callable[..., list[Any]] = self.session.run
        inner_run = getattr(getattr(self.session, "_sess", None), "run", None)
        if self.providers == ["CPUExecutionProvider"] and callable(inner_run):
            self._run = inner_run
        log.info(
            "loaded %s/%d from %s on %s with %d intra-op threads",
            version.name,
            version.version,
            version.onnx_path,
            self.providers[0],
            intra_op_threads,
        )

    def _check_signature(self) -> None:
        graph_inputs = {a.name for a in self.session.get_inputs()}
        graph_outputs = {a.name for a in self.session.get_outputs()}
        declared_inputs = {s.name for s in self.manifest.inputs}
        declared_outputs = {s.name for s in self.manifest.outputs}
        if graph_inputs != declared_inputs or not declared_outputs <= graph_outputs:
            raise ModelLoadError(
                f"{self.version.onnx_path}: graph inputs {sorted(graph_inputs)} / outputs {sorted(graph_outputs)} "
                f"do not match the manifest's {sorted(declared_inputs)} / {sorted(declared_outputs)}"
            )

    @property
    def provider(self) -> str:
        return self.providers[0]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on batch-first inputs; returns every declared output by name."""
        outputs = self._run(self.output_names, inputs if type(inputs) is dict else dict(inputs), None)
        return dict(zip(self.output_names, outputs, strict=True))

    def release_memory(self) -> None:
        """Give the memory that large batches grew onnxruntime's CPU arena by back to the system.

        The arena keeps its peak for good: 40 diffusion streams took the generate service from 230
        to 600 MiB, still held when they were gone. A one-row run with arena shrinkage frees every
        unused chunk (~0.3 s for that arena). The batchers call this once they have been idle for
        a while after a large batch, never on a request's path.
        """
        if self.provider == "CPUExecutionProvider":
            self.session.run(self.output_names, self.example_inputs(1), _SHRINK_CPU_ARENA)

    def example_inputs(self, batch: int) -> dict[str, np.ndarray]:
        """Zero inputs of the manifest's shapes with ``batch`` rows (for warm-up)."""
        return {spec.name: _zeros(spec, batch) for spec in self.manifest.inputs}

    def warmup(self, batch_sizes: Iterable[int] = (1, 8, 64)) -> None:
        """Run once at each batch size so the first real requests do not pay for lazy set-up."""
        for batch in batch_sizes:
            self.predict(self.example_inputs(batch))


_SHRINK_CPU_ARENA = ort.RunOptions()
_SHRINK_CPU_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _zeros(spec: TensorSpec, batch: int) -> np.ndarray:
    shape = [batch if i == 0 else (d if d > 0 else 1) for i, d in enumerate(spec.shape)]
    return np.zeros(shape, dtype=NUMPY_DTYPES[spec.dtype])
