"""Finding the ``Conv2d -> BatchNorm`` pairs of any model from what its forward computes.

A BN can be folded into a conv (or the pair replaced by a re-parameterizable block) only when the BN's **only input
is the conv's output** and the conv's **output feeds nothing else**; each must also run exactly once per forward.
Attribute names and ``nn.Sequential`` order do not tell: a pre-activation ResNet's ``bn1`` normalises the block input,
not ``conv1``'s output; a DenseNet's ``norm1`` sees a concatenation. So the dataflow is read:

* from a ``torch.fx`` trace (as torch's own fusion utilities do), with every ``Conv2d`` and ``_BatchNorm`` a leaf;
* for models that do not trace (data-dependent control flow, timm's shape asserts, ...), from one hooked forward on an
  example input, in eval mode without gradients: module hooks see each conv and BN call, a ``TorchFunctionMode`` sees
  every other operation that reads a conv's output, and a conv output that the model returns counts as read by "the
  model output". Shape/dtype queries do not count as uses. Such pairs hold for the path that one input takes: a
  ``UserWarning`` says so and names the convs and BNs that never ran (they are never paired).

A BN is folded only if its forward is the plain normalisation: ``BatchNorm2d``/``SyncBatchNorm`` (timm's
``BatchNormAct2d``/``SyncBatchNormAct``: normalisation, then dropout and activation) or a subclass that keeps that
``forward``; a subclass with its own ``forward`` is left alone whatever its name. Likewise the conv: ``Conv2d`` or
timm's ``Conv2dSame`` (TF "same" padding of the input), and timm's ``MixedConv2d`` (convs on channel splits,
concatenated), whose BN folds slice by slice; only plain ``Conv2d`` pairs can become blocks (``convert_model``).

Every BN that is not paired is reported with the reason (:class:`SkippedBN`). The caller replaces the conv by a module
that includes the BN and the BN by :func:`bn_tail` (the activation and dropout that timm's ``BatchNormAct2d`` applies
after normalising).

Example::

    found = find_conv_bn_pairs(torchvision.models.resnet18())
    len(found.pairs), found.method          # 20 ('fx'): the 7x7 stem, 16 3x3 convs, 3 downsample 1x1 convs
    for s in find_conv_bn_pairs(preact_resnet).skipped:
        print(s.bn_path, s.reason)         # layer1.0.bn1 input comes from 'relu', not a conv
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["ConvBNPair", "PairSearch", "SkippedBN", "bn_tail", "find_conv_bn_pairs", "foldable_bn",
           "foldable_conv", "parameter_users"]

_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__,
             torch.Tensor.device.__get__, torch.Tensor.ndim.__get__, torch.Tensor.requires_grad.__get__}
_METADATA_FX = {"size", "dim", "shape", "dtype", "device", "ndim"}


# timm (a dependency) is imported on first use, as elsewhere in the package, to keep `import lightning_nd` light
@functools.cache
def _foldable_forwards() -> frozenset:
    """The ``forward`` functions that normalise with running statistics (then, for timm, dropout + activation)."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    return frozenset({nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, BatchNormAct2d.forward, SyncBatchNormAct.forward})


@functools.cache
def _conv_forwards() -> frozenset:
    """Conv ``forward``s that are ``conv2d(x', weight, bias)`` of a linear function x' of the input (timm's TF-"same"
    padding pads first)."""
    from timm.layers.conv2d_same import Conv2dSame

    return frozenset({nn.Conv2d.forward, Conv2dSame.forward})


def _is_concat_conv(m: nn.Module) -> bool:
    """timm ``MixedConv2d`` with its own forward unchanged: split channels, one conv per split, concatenate."""
    from timm.layers.mixed_conv2d import MixedConv2d

    return isinstance(m, MixedConv2d) and type(m).forward is MixedConv2d.forward


def _is_conv(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Conv2d) or (m is not None and _is_concat_conv(m))


def foldable_conv(conv: nn.Module) -> bool:
    """Whether a BN after ``conv`` folds into its weights: a ``Conv2d`` whose forward is ``Conv2d``'s or timm's
    ``Conv2dSame``'s (the padding is applied to the input, so the output is still linear in the weights), or a timm
    ``MixedConv2d`` of such convs (the BN is folded slice by slice)."""
    if _is_concat_conv(conv):
        return all(foldable_conv(c) for c in conv.children())
    return isinstance(conv, nn.Conv2d) and type(conv).forward in _conv_forwards()


def foldable_bn(bn: nn.Module) -> bool:
    """Whether ``bn``'s forward is a known plain normalisation (exact type, or a subclass that keeps the ``forward``).

    A class named ``BatchNorm2d`` with its own ``forward`` is not foldable: its output is not ``t * x + shift``.
    """
    return isinstance(bn, _BatchNorm) and type(bn).forward in _foldable_forwards()


def parameter_users(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(parameter) -> [(module, "path.name"), ...]`` over every path (aliased modules and tied weights included)."""
    users: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            users[id(param)].append((module, f"{path}.{name}" if path else name))
    return users


@dataclass
class ConvBNPair:
    """A conv whose output only feeds a BN, each addressed by its parent module, attribute name and dotted path.

    Raises:
        AttributeError: from :attr:`conv` / :attr:`bn` when the model was changed so the names no longer resolve.

    Example::

        for pair in find_conv_bn_pairs(model).pairs:
            print(pair.conv_path, "->", pair.bn_path)
    """

    conv_parent: nn.Module  # the module holding the conv
    conv_name: str  # attribute name of the conv in ``conv_parent``
    bn_parent: nn.Module  # the module holding the BN
    bn_name: str  # attribute name of the BN in ``bn_parent``
    conv_path: str = ""  # dotted path of the conv in the model
    bn_path: str = ""  # dotted path of the BN in the model

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self.conv_parent, self.conv_name)

    @property
    def bn(self) -> _BatchNorm:
        return getattr(self.bn_parent, self.bn_name)


@dataclass
class SkippedBN:
    """A BatchNorm that is not paired with a conv, and why."""

    bn_path: str  # dotted path of the BN
    reason: str  # e.g. "input comes from 'add', not a conv" or "conv output also feeds 'layer1.0.shortcut'"
    conv_path: str | None = None  # the conv feeding it, when there is one (a rejected candidate)


@dataclass
class PairSearch:
    """The result of :func:`find_conv_bn_pairs`; iterating yields the pairs."""

    pairs: list[ConvBNPair] = field(default_factory=list)  # verified pairs, in forward order
    skipped: list[SkippedBN] = field(default_factory=list)  # every other BN, with the reason
    method: str = "fx"  # "fx" (traced graph) or "hooks" (one hooked forward on the example input)
    never_ran: list[str] = field(default_factory=list)  # hooks only: conv / BN paths the example forward did not call

    def __iter__(self) -> Iterator[ConvBNPair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def rejected(self) -> list[SkippedBN]:
        """Skipped BNs that a conv does feed: candidates that failed a rule (shared output, shared module, ...)."""
        return [s for s in self.skipped if s.conv_path is not None]


@dataclass
class _Flow:
    """What the forward does with convs and BNs, however it was observed."""

    calls: Counter = field(default_factory=Counter)  # module path -> times called
    bn_source: dict[str, str] = field(default_factory=dict)  # BN path -> conv path or description of its input
    bn_order: list[str] = field(default_factory=list)  # BN paths in the order they ran
    conv_users: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # conv path -> readers


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, _BatchNorm)) or _is_concat_conv(m) or super().is_leaf_module(m, qualname)


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "placeholder":
        return "the model input"
    return str(node.target)


def _is_metadata(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target in _METADATA_FX:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_FX


def _flow_from_fx(model: nn.Module) -> _Flow:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    flow = _Flow()
    for node in graph.nodes:
        if node.op != "call_module" or not (_is_conv(modules.get(node.target)) or
                                            isinstance(modules.get(node.target), _BatchNorm)):
            continue
        path = str(node.target)
        flow.calls[path] += 1
        if _is_conv(modules[path]):
            flow.conv_users[path] += [_describe(u) for u in node.users if not _is_metadata(u)]
            continue
        flow.bn_order.append(path)
        src = node.args[0] if node.args else None
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and _is_conv(modules.get(src.target)):
            flow.bn_source[path] = str(src.target)
        else:
            flow.bn_source[path] = repr(_describe(src)) if isinstance(src, torch.fx.Node) else "a constant"
    return flow


class _ReadRecorder(TorchFunctionMode):
    """Records which operations (outside conv/BN modules) read a conv's output."""

    def __init__(self, flow: _Flow) -> None:
        super().__init__()
        self.flow, self.depth = flow, 0
        self.conv_outputs: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (conv path, tensor kept alive)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.depth == 0 and func not in _METADATA:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and id(t) in self.conv_outputs:
                    self.flow.conv_users[self.conv_outputs[id(t)][0]].append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@torch.no_grad()
def _flow_from_hooks(model: nn.Module, example_input: Any) -> _Flow:
    flow = _Flow()
    recorder = _ReadRecorder(flow)

    def pre_hook(path: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            source = recorder.conv_outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
            if source is not None and recorder.depth == 0:
                flow.conv_users[source[0]].append(path)
            if isinstance(module, _BatchNorm) and recorder.depth == 0:
                flow.bn_order.append(path)
                flow.bn_source[path] = source[0] if source is not None else "a non-conv operation"
            recorder.depth += 1
        return hook

    def post_hook(path: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            recorder.depth -= 1
            if recorder.depth == 0:
                flow.calls[path] += 1
                if isinstance(module, nn.Conv2d) and isinstance(out, torch.Tensor):
                    recorder.conv_outputs[id(out)] = (path, out)
                    flow.conv_users.setdefault(path, [])  # registers the conv even if nothing reads it
        return hook

    handles = []
    modes = {m: m.training for m in model.modules()}
    try:
        for path, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, _BatchNorm)):
                handles.append(module.register_forward_pre_hook(pre_hook(path)))
                handles.append(module.register_forward_hook(post_hook(path)))
        model.eval()  # a train-mode forward would update the running statistics
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        with recorder:
            output = model(*args)
        for t in tree_leaves(output):  # a returned conv output is read by the caller: it must keep its value
            if isinstance(t, torch.Tensor) and id(t) in recorder.conv_outputs:
                flow.conv_users[recorder.conv_outputs[id(t)][0]].append("the model output")
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return flow


def _split(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def _decide(model: nn.Module, flow: _Flow, method: str) -> PairSearch:
    modules = dict(model.named_modules())
    found = PairSearch(method=method)
    order = {p: i for i, p in enumerate(flow.bn_order)}
    bns = sorted((p for p, m in modules.items() if isinstance(m, _BatchNorm)), key=lambda p: order.get(p, len(order)))
    for bn_path in bns:
        bn, calls = modules[bn_path], flow.calls[bn_path]
        conv_path = flow.bn_source.get(bn_path)
        conv = modules.get(conv_path) if conv_path is not None else None
        if not _is_conv(conv):
            conv_path = None
        reason = None
        if calls != 1:
            reason = "never called in the forward" if calls == 0 else f"called {calls} times in one forward"
        elif conv_path is None:
            reason = f"input comes from {flow.bn_source.get(bn_path, 'an unknown source')}, not a conv"
        elif flow.calls[conv_path] != 1:
            reason = f"its conv {conv_path} is called {flow.calls[conv_path]} times in one forward"
        elif flow.conv_users[conv_path] != [bn_path]:
            others = sorted({u for u in flow.conv_users[conv_path] if u != bn_path})
            reason = f"its conv's output also feeds {', '.join(map(repr, others))}"
        elif not foldable_conv(conv):
            reason = f"its conv is a {type(conv).__name__} (own forward), not a plain Conv2d"
        elif not foldable_bn(bn):
            reason = (f"{type(bn).__module__}.{type(bn).__qualname__} has its own forward (not BatchNorm2d's "
                      "normalisation), so folding it could change the output")
        elif conv.out_channels != bn.num_features:
            reason = f"{conv.out_channels} conv channels but {bn.num_features} BN features"
        elif bn.running_mean is None:
            reason = "no running statistics (track_running_stats=False)"
        if reason is not None:
            found.skipped.append(SkippedBN(bn_path, reason, conv_path))
            continue
        conv_parent, conv_name = _split(model, conv_path)
        bn_parent, bn_name = _split(model, bn_path)
        found.pairs.append(ConvBNPair(conv_parent, conv_name, bn_parent, bn_name, conv_path, bn_path))
    return found


def find_conv_bn_pairs(model: nn.Module, example_input: Any = None) -> PairSearch:
    """The verified ``Conv2d -> BN`` pairs of ``model`` and every other BN with the reason it is not paired.

    Args:
        model: any module. It is traced with ``torch.fx``; its weights and training flags are not changed.
        example_input: an input (or tuple of positional inputs) for models that ``torch.fx`` cannot trace: one
            eval-mode forward under ``no_grad`` with hooks is run instead. Unused when the trace works.

    Raises:
        ValueError: when the model does not trace and no ``example_input`` was given (the message has the trace
            error).

    Example::

        found = find_conv_bn_pairs(timm.create_model("efficientnet_b0"), torch.randn(1, 3, 32, 32))
        print(len(found.pairs), found.method, found.rejected)
    """
    try:
        flow, method = _flow_from_fx(model), "fx"
    except Exception as error:  # any trace failure means: observe a real forward instead
        if example_input is None:
            raise ValueError(
                f"{type(model).__name__} does not trace with torch.fx ({type(error).__name__}: {error}); pass "
                "example_input (a sample batch; the Lightning callbacks read LightningModule.example_input_array) so "
                "conv -> BN pairs are found from one hooked forward"
            ) from error
        flow, method = _flow_from_hooks(model, example_input), "hooks"
        found = _decide(model, flow, method)
        found.never_ran = [p for p, m in model.named_modules() if isinstance(m, (nn.Conv2d, _BatchNorm))
                           and flow.calls[p] == 0]
        idle = f"; never ran, so not paired: {', '.join(found.never_ran[:8])}" if found.never_ran else ""
        idle += f" (+{len(found.never_ran) - 8} more)" if len(found.never_ran) > 8 else ""
        warnings.warn(
            f"find_conv_bn_pairs: {type(model).__name__} does not trace with torch.fx ({type(error).__name__}), so its "
            f"{len(found.pairs)} conv -> BN pairs come from ONE forward on the example input (example_input / "
            f"example_input_array): a code path that input does not take is not seen{idle}",
            UserWarning,
            stacklevel=2,
        )
        return found
    return _decide(model, flow, method)


def bn_tail(bn: nn.Module) -> nn.Module:
    """What stays in the BN's place once it is folded: ``Identity``, or timm ``BatchNormAct2d``'s dropout + act."""
    parts = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
    parts = [p for p in parts if not isinstance(p, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)
