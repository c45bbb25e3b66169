"""The block contract: what a residual block declares about itself so that the monitor, the
lesion and paths probes and the init schemes never guess its structure from names.

A residual block computes ``after(shortcut(u) + branch(v))``. The contract names

- ``entry``: the branch's first module; its first input is the branch's input ``v``;
- ``exit``: the module whose output is the branch's last tensor, the term added to the
  shortcut (up to the block's own learnable scalars: SkipInit's and Fixup's ``scale``);
- ``shortcut``: ``"identity"``, ``"projection"`` (any module, option A's zero padding too) or
  ``"none"`` (a plain twin), and ``projection``, the module computing it (for an identity
  shortcut: an ``nn.Identity`` the block calls, or None where it adds its input itself);
- ``shared``: True where branch and shortcut both read a tensor the block computes first, not
  its input (He et al. 2016b's pre-activation blocks whose shortcut is a projection:
  ``u = v = relu(bn1(x))``); the split of the gradient is then that tensor's;
- ``after``: what follows the addition, ``"relu"`` or ``"none"``.

skipstudy's blocks declare it in :meth:`~skipstudy.models.blocks.Block.block_contract`; any
module may do the same by defining ``block_contract()``. Other people's blocks get theirs from
an adapter in :data:`ADAPTERS`, keyed by the exact class (a subclass may change ``forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from torch import nn

from skipstudy.errors import ConfigError


# pydantic checks the fields' types and values (the modules are nn.Modules, the names valid).
@dataclass(frozen=True, config=ConfigDict(arbitrary_types_allowed=True))
class BlockContract:
    entry: nn.Module
    exit: nn.Module
    shortcut: Literal["identity", "projection", "none"]
    projection: nn.Module | None = None
    shared: bool = False
    after: Literal["relu", "none"] = "relu"

    def __post_init__(self) -> None:
        if self.shortcut == "projection" and self.projection is None:
            raise ValueError("BlockContract: a projection shortcut needs its module (projection=...)")
        if self.shared and self.projection is None:
            # The split is then of a tensor inside the block: both parts must be hooked directly.
            raise ValueError("BlockContract: shared=True needs the shortcut's module (projection=...)")

    @property
    def has_shortcut(self) -> bool:
        return self.shortcut != "none"


def _first(*modules: nn.Module | None) -> nn.Module:
    return next(m for m in modules if m is not None)


def _torchvision_resnet(block: nn.Module) -> BlockContract:
    """torchvision's BasicBlock and Bottleneck: ``relu(bn_last(...) + (downsample or x))``."""
    down = block.downsample
    return BlockContract(block.conv1, _first(getattr(block, "bn3", None), block.bn2),
                         "identity" if down is None else "projection", down)


def _timm_resnet(block: nn.Module) -> BlockContract | None:
    """timm's ResNet BasicBlock and Bottleneck: the branch ends at ``drop_path``, else the
    squeeze-excitation, else the last norm; ``act2``/``act3`` after the addition (a ReLU in
    every timm ResNet model). A block built with another ``act_layer`` declares nothing: the
    lesion probe would otherwise apply a ReLU where the block applies something else."""
    if not isinstance(getattr(block, "act3", None) or block.act2, nn.ReLU):
        return None
    down = block.downsample
    last_norm = getattr(block, "bn3", None) or block.bn2
    return BlockContract(block.conv1, _first(block.drop_path, block.se, last_norm),
                         "identity" if down is None else "projection", down)


def _timm_convnext(block: nn.Module) -> BlockContract:
    """timm's ConvNeXtBlock: ``drop_path(gamma * mlp(norm(conv_dw(x)))) + shortcut(x)``,
    nothing after; ``shortcut`` is an ``nn.Identity`` or a ``Downsample``."""
    identity = isinstance(block.shortcut, nn.Identity)
    return BlockContract(block.conv_dw, block.drop_path, "identity" if identity else "projection",
                         block.shortcut, after="none")


# Declared adapters for other people's blocks, by the block's module and class name (no import
# of timm needed to declare them).
ADAPTERS: dict[str, Callable[[nn.Module], BlockContract | None]] = {
    "torchvision.models.resnet.BasicBlock": _torchvision_resnet,
    "torchvision.models.resnet.Bottleneck": _torchvision_resnet,
    "timm.models.resnet.BasicBlock": _timm_resnet,
    "timm.models.resnet.Bottleneck": _timm_resnet,
    "timm.models.convnext.ConvNeXtBlock": _timm_convnext,
}


def contract_of(module: nn.Module) -> BlockContract | None:
    """The module's declared contract: its own ``block_contract()``, else its class's adapter,
    else None (not a declared residual block)."""
    declare = getattr(module, "block_contract", None)
    if callable(declare):
        return declare()
    adapter = ADAPTERS.get(f"{type(module).__module__}.{type(module).__qualname__}")
    return adapter(module) if adapter is not None else None


# What makes an undeclared module look like a residual block: its class name or an attribute
# the usual implementations give the shortcut.
_BLOCK_WORDS = ("block", "bottleneck", "residual")
_SHORTCUT_ATTRS = ("downsample", "shortcut", "skip_connection")


def looks_residual(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    if type(module).__module__.startswith("torch.nn"):
        return False
    return any(w in name for w in _BLOCK_WORDS) or any(hasattr(module, a) for a in _SHORTCUT_ATTRS)


def read_blocks(net: nn.Module) -> tuple[list[tuple[str, nn.Module, BlockContract]], list[str]]:
    """``net``'s declared residual blocks in registration order, ``(name, module, contract)``,
    and the names of the modules that look like residual blocks but declare nothing (their
    insides are not searched further). A declared block's own submodules are its parts."""
    declared, undeclared, inside = [], [], set()
    for name, module in net.named_modules():
        parts = name.split(".")
        if not name or any(".".join(parts[:i]) in inside for i in range(1, len(parts))):
            continue
        contract = contract_of(module)
        if contract is not None:
            declared.append((name, module, contract))
            inside.add(name)
        # Not a stage named "...Block..." that holds declared blocks.
        elif looks_residual(module) and not any(contract_of(m) for m in module.modules() if m is not module):
            undeclared.append(name)
            inside.add(name)
    return declared, undeclared


def require_declared(net: nn.Module, probe: str) -> None:
    """Refuse ``probe`` on a net with residual-looking blocks that declare nothing: deleting or
    routing around a branch needs to know where it starts and what the shortcut reads."""
    undeclared = read_blocks(net)[1]
    if undeclared:
        kinds = ", ".join(sorted({type(net.get_submodule(n)).__name__ for n in undeclared}))
        raise ConfigError(f"probe={probe}: {len(undeclared)} block(s) of type {kinds} ({', '.join(undeclared[:3])}) "
                          "declare no block contract; give the class a block_contract() (skipstudy.models.contract)")
