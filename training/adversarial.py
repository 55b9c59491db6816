"""L-infinity attacks (FGSM, PGD with a random start) on [0, 1] pixels, and the robustness report.

The attacks need gradients, which onnxruntime does not give, so a shipped ONNX file is first
rebuilt as a torch module by :func:`torch_from_onnx` (a small interpreter for the operators
the classifiers use, checked against onnxruntime); the adversarial images are then scored
by onnxruntime itself, so every reported accuracy is the served graph's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from training.export import onnx_session, run_onnx


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps, clipped to [0, 1]."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x.detach() + eps * grad.sign()).clamp(0, 1)


def pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    stop_when_fooled: bool = False,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) from a uniform random start in the eps-ball.

    The step defaults to 2.5 * eps / steps, so the walk can cross the ball; each iterate is
    projected back onto the ball and onto [0, 1]. ``model`` should be in eval mode. With
    ``stop_when_fooled`` an image keeps the first iterate the model misclassifies and leaves
    the batch: the same attack or a stronger one (it keeps a success the last step might undo),
    and much cheaper on a model that falls in a few steps.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    result = (x + delta).clamp(0, 1)
    active = torch.arange(len(x))
    adv = result.clone()
    for _ in range(steps):
        xa, ya = x[active], y[active]
        adv = adv.detach().requires_grad_(True)
        logits = model(adv)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, ya, reduction="sum"), adv)
        if stop_when_fooled:
            fooled = logits.detach().argmax(1) != ya
            result[active[fooled]] = adv.detach()[fooled]
            keep = ~fooled
            active, adv, grad, xa = active[keep], adv[keep], grad[keep], xa[keep]
            if len(active) == 0:
                return result
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.min(torch.max(adv, xa - eps), xa + eps).clamp(0, 1)
    result[active] = adv.detach()
    return result


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}
_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Pow": torch.pow,
    "MatMul": torch.matmul,
}
_UNARY = {
    "Relu": torch.relu,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Identity": lambda x: x,
    "Abs": torch.abs,
    "Sigmoid": torch.sigmoid,
}


class OnnxModule(torch.nn.Module):
    """A differentiable torch rendering of one output of an ONNX graph.

    Only the nodes that output depends on are run. Covers the operators the exported
    classifiers use (convolution, pooling, Gemm, reductions, element-wise arithmetic, shape
    plumbing); anything else raises ``NotImplementedError`` naming the operator.
    """

    def __init__(self, path: str | Path, output: str | None = None) -> None:
        super().__init__()
        model = onnx.load(str(path))
        graph = model.graph
        self.input_name = graph.input[0].name
        self.output_name = output or graph.output[0].name
        self.constants = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
        producers = {out: node for node in graph.node for out in node.output}
        needed: set[str] = set()
        stack = [self.output_name]
        while stack:
            name = stack.pop()
            node = producers.get(name)
            if node is None or node.name + "|" + node.output[0] in needed:
                continue
            needed.add(node.name + "|" + node.output[0])
            stack.extend(i for i in node.input if i)
        self.nodes = [n for n in graph.node if n.name + "|" + n.output[0] in needed]
        for node in self.nodes:
            if node.op_type not in _SUPPORTED:
                raise NotImplementedError(f"{path}: operator {node.op_type} is not supported by OnnxModule")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = {**self.constants, self.input_name: x}
        for node in self.nodes:
            args = [values[i] if i else None for i in node.input]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            outs = _run_node(node.op_type, args, attrs)
            values[node.output[0]] = outs
        return values[self.output_name]


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _run_node(op: str, a: list[Any], attrs: dict[str, Any]) -> torch.Tensor:  # noqa: C901 - one dispatch table
    if op in _UNARY:
        return _UNARY[op](a[0])
    if op in _BINARY:
        return _BINARY[op](a[0], a[1])
    if op == "Conv":
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        x = a[0]
        if pads[:2] != pads[2:]:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            pads = [0, 0, 0, 0]
        return F.conv2d(
            x, a[1], a[2] if len(a) > 2 else None, stride=tuple(attrs.get("strides", [1, 1])),
            padding=tuple(pads[:2]), dilation=tuple(attrs.get("dilations", [1, 1])), groups=int(attrs.get("group", 1)),
        )  # fmt: skip
    if op == "MaxPool":
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return F.max_pool2d(
            a[0], tuple(attrs["kernel_shape"]), stride=tuple(attrs.get("strides", attrs["kernel_shape"])),
            padding=tuple(pads[:2]), dilation=tuple(attrs.get("dilations", [1, 1])),
            ceil_mode=bool(attrs.get("ceil_mode", 0)),
        )  # fmt: skip
    if op == "BatchNormalization":
        return F.batch_norm(a[0], a[3], a[4], a[1], a[2], training=False, eps=float(attrs.get("epsilon", 1e-5)))
    if op == "Gemm":
        x, w = a[0], a[1]
        x = x.T if attrs.get("transA", 0) else x
        w = w.T if attrs.get("transB", 0) else w
        y = attrs.get("alpha", 1.0) * (x @ w)
        return y + attrs.get("beta", 1.0) * a[2] if len(a) > 2 and a[2] is not None else y
    if op in _REDUCE:
        axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else list(attrs.get("axes", []))
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return a[0]
            axes = list(range(a[0].dim()))
        return _REDUCE[op](a[0], dim=tuple(axes), keepdim=keep)
    if op == "Reshape":
        shape = _ints(a[1])
        shape = [a[0].shape[i] if s == 0 and not attrs.get("allowzero", 0) else s for i, s in enumerate(shape)]
        return a[0].reshape(shape)
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))
        return a[0].reshape(int(math.prod(a[0].shape[:axis])), -1)
    if op == "Concat":
        return torch.cat(a, dim=int(attrs["axis"]))
    if op == "Unsqueeze":
        x = a[0]
        for ax in sorted(_ints(a[1])):
            x = x.unsqueeze(ax)
        return x
    if op == "Squeeze":
        axes = _ints(a[1]) if len(a) > 1 else []
        return a[0].squeeze(tuple(axes)) if axes else a[0].squeeze()
    if op == "Transpose":
        return a[0].permute(*attrs["perm"])
    if op == "Slice":
        x = a[0]
        starts, ends = _ints(a[1]), _ints(a[2])
        axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
        steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
        for ax, s, e, st in zip(axes, starts, ends, steps, strict=True):
            idx = torch.arange(*slice(s, e, st).indices(x.shape[ax]))
            x = x.index_select(ax, idx)
        return x
    if op == "Constant":
        return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
    if op == "Shape":
        return torch.tensor(list(a[0].shape), dtype=torch.int64)
    if op == "Gather":
        return torch.index_select(a[0], int(attrs.get("axis", 0)), a[1].reshape(-1)).reshape(
            *a[0].shape[: int(attrs.get("axis", 0))], *a[1].shape, *a[0].shape[int(attrs.get("axis", 0)) + 1 :]
        )
    if op == "Cast":
        return a[0].to(_DTYPES[int(attrs["to"])])
    if op == "Softmax":
        return torch.softmax(a[0], dim=int(attrs.get("axis", -1)))
    if op == "LogSoftmax":
        return torch.log_softmax(a[0], dim=int(attrs.get("axis", -1)))
    raise NotImplementedError(op)


_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 11: torch.float64}
_SUPPORTED = set(_UNARY) | set(_BINARY) | set(_REDUCE) | {
    "Conv", "MaxPool", "BatchNormalization", "Gemm", "Reshape", "Flatten", "Concat", "Unsqueeze", "Squeeze",
    "Transpose", "Slice", "Constant", "Shape", "Gather", "Cast", "Softmax", "LogSoftmax",
}  # fmt: skip


def _correct(session: Any, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = run_onnx(session, {session.get_inputs()[0].name: images.astype(np.float32)})[0]
    return logits.argmax(1) == labels


def attack_images(
    module: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    attack: str,
    eps: float,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 500,
) -> np.ndarray:
    """Adversarial versions of float32 [N, 1, 28, 28] ``images``: ``attack`` is "fgsm" or "pgd"."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s : s + batch_size])
        y = torch.from_numpy(labels[s : s + batch_size])
        if eps == 0:
            out.append(x.numpy())
        elif attack == "fgsm":
            out.append(fgsm(module, x, y, eps).numpy())
        else:
            out.append(pgd(module, x, y, eps, steps, generator=generator, stop_when_fooled=True).numpy())
    return np.concatenate(out)


def _attack_task(
    model_path: str, images: np.ndarray, labels: np.ndarray, attack: str, eps: float, steps: int, seed: int
) -> np.ndarray:
    """One chunk of one attack, in a worker process: which adversarial images onnxruntime still gets right."""
    torch.set_num_threads(1)
    session = onnx_session(Path(model_path), threads=1)
    module = OnnxModule(model_path).eval()
    adv = attack_images(module, images, labels, attack, eps, steps, seed)
    return _correct(session, adv, labels)


def robustness_report(
    model_path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    eps_grid: tuple[float, ...] = (0.02, 0.05, 0.1),
    fgsm_eps: tuple[float, ...] = (0.05, 0.1),
    steps: int = 20,
    steps_check: tuple[float, int, int] | None = (0.1, 50, 500),
    seed: int = 0,
    workers: int = 1,
    chunk: int = 500,
) -> dict[str, Any]:
    """Accuracy of an exported classifier under FGSM and PGD (L-inf, random start), scored by onnxruntime.

    ``images`` uint8 [N, 28, 28] (a fixed subset of the test set). PGD runs ``steps`` steps of
    2.5 eps / steps at every eps of ``eps_grid``; ``steps_check`` (eps, more steps, images)
    repeats PGD with more steps on the first images, to show that accuracy does not rise
    when the attack gets stronger (no gradient masking). Chunks of ``chunk`` images run in
    ``workers`` processes (each seeded by its position, so the figures do not depend on
    ``workers``).
    """
    from concurrent.futures import Executor, ProcessPoolExecutor
    from multiprocessing import get_context

    path = str(model_path)
    session = onnx_session(Path(path))
    module = OnnxModule(path).eval()
    x = (images.astype(np.float32) / 255.0)[:, None]
    reference = run_onnx(session, {session.get_inputs()[0].name: x[:200]})[0]
    with torch.no_grad():
        parity = float(np.abs(reference - module(torch.from_numpy(x[:200])).numpy()).max())
    jobs: list[tuple[str, float, int, int]] = [("fgsm", e, 1, len(x)) for e in fgsm_eps]
    jobs += [("pgd", e, steps, len(x)) for e in eps_grid]
    if steps_check is not None:
        jobs.append(("pgd", steps_check[0], steps_check[1], min(steps_check[2], len(x))))
    executor: Executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    with executor:
        futures = {
            (attack, eps, n_steps, s): executor.submit(
                _attack_task, path, x[s : min(s + chunk, n)], labels[s : min(s + chunk, n)], attack, eps, n_steps,
                seed + s,
            )
            for attack, eps, n_steps, n in jobs
            for s in range(0, n, chunk)
        }  # fmt: skip
        correct = {
            (attack, eps, n_steps): np.concatenate(
                [futures[(attack, eps, n_steps, s)].result() for s in range(0, n, chunk)]
            )
            for attack, eps, n_steps, n in jobs
        }
    report: dict[str, Any] = {
        "images": int(len(x)),
        "seed": seed,
        "interpreter_max_abs_diff": float(f"{parity:.3g}"),
        "clean": round(float(_correct(session, x, labels).mean()), 4),
        "fgsm": {str(e): round(float(correct[("fgsm", e, 1)].mean()), 4) for e in fgsm_eps},
        f"pgd{steps}": {str(e): round(float(correct[("pgd", e, steps)].mean()), 4) for e in eps_grid},
    }
    if steps_check is not None:
        eps, more, n = steps_check
        n = min(n, len(x))
        base = correct[("pgd", eps, steps)][:n] if eps in eps_grid else None
        report["steps_check"] = {
            "eps": eps,
            "images": int(n),
            f"pgd{steps}": None if base is None else round(float(base.mean()), 4),
            f"pgd{more}": round(float(correct[("pgd", eps, more)].mean()), 4),
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Print the robustness report of one exported classifier on a fixed test subset."""
    import argparse
    import json

    from training.data import load_split

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/classifier/1"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    test = load_split("test")
    idx = test_subset(len(test), args.images, args.seed)
    report = robustness_report(
        args.model_dir / "model.onnx", test.images[idx], test.labels[idx], seed=args.seed, workers=args.workers
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


def test_subset(total: int, n: int, seed: int = 0) -> np.ndarray:
    """The fixed test-set indices every robustness figure uses (sorted, seeded)."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


if __name__ == "__main__":
    raise SystemExit(main())
