"""bnext.fuse_model: batch norm -> activation and batch norm -> add -> activation chains of a
network become bnext's fused layers (bnext.BatchNormAct1d/2d/3d).

Two ways to find them:
* layers that are already BN + activation (timm's BatchNormAct2d, with no dropout) map to a
  fused layer directly, in place;
* everything else is found in the model's torch.fx graph (torch.fx.symbolic_trace): a batch norm
  layer (torch's or bnext's, exact classes) whose only user is an activation, or an add whose only
  user is an activation, the batch norm output being used by that add only. The activation may be
  a module (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish) or a function (F.relu, torch.relu,
  Tensor.relu, their in-place forms, F.leaky_relu, F.elu, F.silu, F.hardswish), in place or not.

The fused layer takes the batch norm's place (the same qualified name, parameters and buffers), so
every state_dict key stays, and the same tensors are shared with the model given. Anything else
(a batch norm whose output has other users, an activation with arguments the fused kernels do not
take, a model FX cannot trace) is left alone: the result computes what the model computed.
"""
import logging
import operator
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

logger = logging.getLogger("bnext")

_FUSED = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
    BatchNorm1d: BatchNormAct1d,
    BatchNorm2d: BatchNormAct2d,
    BatchNorm3d: BatchNormAct3d,
}

_ADDS = {operator.add, operator.iadd, torch.add}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}


def _module_activation(m: nn.Module) -> Optional[Tuple[str, dict]]:
    """(activation, its keyword arguments) of an activation module the fused layers compute."""
    t = type(m)
    if t is nn.ReLU:
        return "relu", {}
    if t is nn.LeakyReLU:
        return "leaky_relu", {"negative_slope": float(m.negative_slope)}
    if t is nn.ELU:
        return "elu", {"alpha": float(m.alpha)}
    if t is nn.SiLU:
        return "silu", {}
    if t is nn.Hardswish:
        return "hardswish", {}
    if t is nn.Identity:
        return "identity", {}
    return None


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _node_activation(node, modules) -> Optional[Tuple[str, dict]]:
    """The activation a graph node applies to its first argument, or None."""
    if node.op == "call_module":
        act = _module_activation(modules[node.target])
        return act if act is not None and act[0] != "identity" else None
    if node.op == "call_function":
        f = node.target
        if f in _RELU_FUNCTIONS:
            return "relu", {}
        if f is F.leaky_relu:
            slope = _arg(node, 1, "negative_slope", 0.01)
            return ("leaky_relu", {"negative_slope": float(slope)}) if isinstance(slope, (int, float)) else None
        if f is F.elu:
            alpha = _arg(node, 1, "alpha", 1.0)
            return ("elu", {"alpha": float(alpha)}) if isinstance(alpha, (int, float)) else None
        if f is F.silu:
            return "silu", {}
        if f is F.hardswish:
            return "hardswish", {}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", {}
    return None


def _is_add(node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        ok_kwargs = not node.kwargs or (set(node.kwargs) == {"alpha"} and node.kwargs["alpha"] == 1)
        return len(node.args) == 2 and ok_kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _fused_layer(bn: nn.Module, activation: str, kwargs: dict, cls=None) -> nn.Module:
    """A fused layer (`cls`, by default the one of bn's class) in place of `bn`, sharing its
    parameters and buffers."""
    cls = cls or _FUSED[type(bn)]
    out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, activation=activation, **kwargs)
    out._parameters, out._buffers, out.training = bn._parameters, bn._buffers, bn.training
    return out


def _replace_timm_layers(model: nn.Module, prefix: str, fused: List[str]) -> nn.Module:
    """timm's BatchNormAct2d (a BatchNorm2d whose forward applies .drop and .act): a fused layer
    where drop is an identity and act one of the activations the kernels compute."""
    for name, child in list(model.named_children()):
        path = f"{prefix}{name}"
        if (
            type(child).__name__ == "BatchNormAct2d"
            and isinstance(child, nn.BatchNorm2d)
            and isinstance(getattr(child, "drop", None), nn.Identity)
            and isinstance(getattr(child, "act", None), nn.Module)
            and _module_activation(child.act) is not None
        ):
            activation, kwargs = _module_activation(child.act)
            # In place: such a layer is the fused layer's equivalent.
            setattr(model, name, _fused_layer(child, activation, kwargs, BatchNormAct2d))
            fused.append(f"{path} ({activation})")
        else:
            _replace_timm_layers(child, path + ".", fused)
    return model


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_graph(gm: torch.fx.GraphModule, fused: List[str]) -> None:
    modules = dict(gm.named_modules())
    graph = gm.graph
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module" or type(modules.get(bn_node.target)) not in _FUSED:
            continue
        if len(bn_node.args) != 1 or bn_node.kwargs or len(bn_node.users) != 1:
            continue
        user = next(iter(bn_node.users))
        residual = None
        act_node = user
        if _is_add(user) and len(user.users) == 1:
            other = user.args[1] if user.args[0] is bn_node else user.args[0]
            if not isinstance(other, torch.fx.Node) or other is bn_node:
                continue
            residual, act_node = other, next(iter(user.users))
        act = _node_activation(act_node, modules) if act_node.args and act_node.args[0] is (
            bn_node if residual is None else user
        ) else None
        if act is None:
            continue
        activation, kwargs = act
        layer = _fused_layer(modules[bn_node.target], activation, kwargs)
        _set_submodule(gm, bn_node.target, layer)
        modules[bn_node.target] = layer
        args = (bn_node.args[0],) if residual is None else (bn_node.args[0], residual)
        with graph.inserting_after(act_node):
            new = graph.call_module(bn_node.target, args)
        act_node.replace_all_uses_with(new)
        graph.erase_node(act_node)
        if residual is not None:
            graph.erase_node(user)
        graph.erase_node(bn_node)
        fused.append(f"{bn_node.target}{' + add' if residual is not None else ''} + {activation}")
    graph.lint()
    gm.recompile()


def fuse_model(model: nn.Module) -> nn.Module:
    """The model with its batch norm -> (add ->) activation chains fused into bnext.BatchNormAct
    layers (see this module's docstring). Returns a torch.fx.GraphModule where the graph was traced
    (the model itself, changed in place, where only whole BN + activation layers were mapped), with
    the same parameters, buffers and state_dict keys, in the same training mode. The fused chains
    are logged (logger "bnext", INFO) and listed in the result's `bnext_fused` attribute."""
    fused: List[str] = []
    model = _replace_timm_layers(model, "", fused)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # FX cannot trace every model: keep what the module-level pass did
        logger.info("bnext.fuse_model: torch.fx could not trace %s (%s); fused layers only", type(model).__name__, e)
        result = model
    else:
        gm.training = model.training
        _fuse_graph(gm, fused)
        result = gm
    for line in fused:
        logger.info("bnext.fuse_model: fused %s", line)
    result.bnext_fused = fused
    return result
