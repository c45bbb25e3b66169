"""The networks are the experimental variable: check they are exactly what they claim to be."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from conftest import group_option
from skipstudy import config, models
from skipstudy.errors import ConfigError
from skipstudy.models.blocks import (
    BasicBlock,
    Block,
    Bottleneck,
    ZeroPadShortcut,
    identity_shortcut,
    make_stage,
)
from skipstudy.probes import lesion, paths

CONF = Path(__file__).resolve().parents[1] / "conf"
MODEL_YAMLS = sorted((CONF / "model").glob("*.yaml"))
IMAGENET_BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _dataset_shapes() -> list[tuple[int, int, int]]:
    """(channels, image_size, num_classes) of every dataset config, plus CIFAR and Tiny ImageNet."""
    shapes = {(3, 32, 10), (3, 64, 200)}
    for path in sorted((CONF / "dataset").glob("*.yaml")):
        cfg = group_option("dataset", path.stem)
        size, classes = cfg.get("image_size"), cfg.get("num_classes", 10)
        channels = cfg.get("channels", 3)
        if all(isinstance(v, int) for v in (size, classes, channels)):
            shapes.add((channels, size, classes))
    return sorted(shapes)


def _build(name: str, **options) -> nn.Module:
    return getattr(models, name)(num_classes=10, **options)


# (label, builder, options) of one instance of every builder; all take 32 px inputs.
NETS = [("mini", "mini", {}), ("cifar_resnet20", "cifar_resnet", {"depth": 20})] + [
    (name, name, {}) for name in IMAGENET_BUILDERS
] + [("preact_resnet20", "preact_resnet", {"depth": 20}),
     ("preact_resnet29_bottleneck", "preact_resnet", {"depth": 29, "block": "bottleneck"}),
     ("preact_resnet18", "preact_resnet", {"family": "imagenet", "depth": 18}),
     ("wrn_10_2", "wide_resnet", {"depth": 10, "width": 2, "dropout": 0.3})]


# The deepest nets take seconds each to build and run on 2 cores: their cases run with -m slow.
DEEPEST = {"resnet101", "resnet152", "wide_resnet"}


# --- every config builds, at every dataset's shape ------------------------------------------


@pytest.mark.parametrize("channels,size,classes", _dataset_shapes())
@pytest.mark.parametrize("yaml", [pytest.param(p, marks=pytest.mark.slow) if p.stem in DEEPEST else p
                                  for p in MODEL_YAMLS], ids=lambda p: p.stem)
def test_every_model_config_gives_logits_at_dataset_shape(yaml, channels, size, classes):
    cfg = group_option("model", yaml.stem)
    assert "num_classes" not in cfg and "in_channels" not in cfg, "these come from the dataset"
    net = hydra.utils.instantiate(cfg, num_classes=classes, in_channels=channels).eval()
    models.check_input_size(net, size)
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_cli_overrides_compose_and_build():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+model=resnet50", "model.skip=false", "model.norm=none", "model.stem=cifar"])
        bad = compose(overrides=["+model=resnet50", "model.skip=maybe"])
        deep = compose(overrides=["+model=cifar_resnet", "model.depth=56", "model.shortcut=B"])
    GlobalHydra.instance().clear()
    net = hydra.utils.instantiate(cfg.model, num_classes=10)
    assert all(b.shortcut is None for b in net.modules() if isinstance(b, Block))
    assert net.downsample_factor == 8
    assert sum(isinstance(b, Block) for b in hydra.utils.instantiate(deep.model, num_classes=10).modules()) == 27
    # The builders take checked values: the check, before any build, names the key to change.
    with pytest.raises(ConfigError) as info:
        config.check_group("model", bad.model._target_, bad.model)
    assert str(info.value) == "model.skip='maybe' must be true or false; e.g. model.skip=true"


# --- He et al. 2016, Table 6 --------------------------------------------------------------

# Parameter counts as the paper prints them, in millions.
TABLE6 = {20: "0.27", 32: "0.46", 44: "0.66", 56: "0.85", 110: "1.7", 1202: "19.4"}


@pytest.mark.parametrize("depth", sorted(TABLE6))
def test_cifar_resnet_parameter_counts_match_table6(depth):
    net = models.cifar_resnet(num_classes=10, depth=depth)
    count = sum(p.numel() for p in net.parameters())
    printed = TABLE6[depth]
    decimals = len(printed.split(".")[1])
    assert f"{count / 1e6:.{decimals}f}" == printed
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()) == depth  # 6n+2 layers
    # Option A shortcuts are parameter-free: the plain twin has exactly as many parameters.
    plain = models.cifar_resnet(num_classes=10, depth=depth, skip=False)
    assert sum(p.numel() for p in plain.parameters()) == count


def test_cifar_option_b_adds_exactly_the_two_projections():
    a = models.cifar_resnet(num_classes=10, depth=20, shortcut="A")
    b = models.cifar_resnet(num_classes=10, depth=20, shortcut="B")
    extra = {k for k, _ in b.named_parameters()} - {k for k, _ in a.named_parameters()}
    assert extra == {
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
        "layer3.0.downsample.0.weight", "layer3.0.downsample.1.weight", "layer3.0.downsample.1.bias",
    }
    assert b.layer2[0].downsample[0].weight.shape == (32, 16, 1, 1)
    assert a.layer1[0].shortcut is identity_shortcut
    x = torch.randn(2, 16, 8, 8)
    padded = a.layer2[0].shortcut(x)  # option A: subsample, then zero channels
    assert padded.shape == (2, 32, 4, 4)
    assert torch.equal(padded[:, :16], x[:, :, ::2, ::2]) and not padded[:, 16:].any()


# --- torchvision parity ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strictly_and_gives_identical_logits(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None).eval()
    ours = getattr(models, name)(num_classes=1000).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {n for n, _ in ours.named_modules()} == {n for n, _ in theirs.named_modules()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # The init schemes that add no parameters keep the torchvision layout too.
    for init in ("kaiming", "zero_residual"):
        getattr(models, name)(num_classes=1000, init=init).load_state_dict(theirs.state_dict(), strict=True)


def test_zero_residual_matches_torchvision_zero_init_residual():
    theirs = torchvision.models.resnet18(weights=None, zero_init_residual=True)
    ours = models.resnet18(num_classes=1000, init="zero_residual")
    theirs_modules = dict(theirs.named_modules())
    norms = [(n, m) for n, m in ours.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20
    for name, norm in norms:  # norm weights and biases are set exactly, not sampled
        assert torch.equal(norm.weight, theirs_modules[name].weight), name
        assert torch.equal(norm.bias, theirs_modules[name].bias), name
    assert not ours.layer3[1].bn2.weight.any() and ours.layer3[1].bn1.weight.all()


# --- plain twins ------------------------------------------------------------------------------


def _assert_every_parameter_gets_a_gradient(net: nn.Module, size: int) -> None:
    net.train()
    torch.manual_seed(0)
    loss = nn.functional.cross_entropy(net(torch.randn(2, 3, size, size)), torch.tensor([0, 1]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("label,builder,options", [pytest.param(*n, marks=pytest.mark.slow) if n[0] in DEEPEST else n
                                                  for n in NETS], ids=[n[0] for n in NETS])
def test_plain_twin_has_no_shortcut_and_every_parameter_learns(label, builder, options):
    net = _build(builder, skip=False, **options)
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    assert blocks and all(b.shortcut is None for b in blocks)
    assert not any("downsample" in n for n, _ in net.named_parameters())
    _assert_every_parameter_gets_a_gradient(net, 32)


@pytest.mark.parametrize("builder,options", [
    ("mini", {}), ("cifar_resnet", {"depth": 20}), ("cifar_resnet", {"depth": 20, "shortcut": "B"}),
    ("resnet18", {"stem": "cifar"}),
])
def test_plain_twin_without_norm_every_parameter_learns(builder, options):
    torch.manual_seed(0)
    net = _build(builder, skip=False, norm="none", init="kaiming", **options)
    _assert_every_parameter_gets_a_gradient(net, 32)


@pytest.mark.parametrize("name", ["mini", "resnet18", "resnet50"])
def test_plain_twin_is_the_residual_net_minus_projections(name):
    residual = dict(_build(name).named_parameters())
    plain = dict(_build(name, skip=False).named_parameters())
    assert set(plain) == {k for k in residual if ".downsample." not in k}
    for k, p in plain.items():
        assert p.shape == residual[k].shape


# --- norm=none -----------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_norm_none_has_no_norm_layers(skip):
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    for label, builder, options in NETS:
        net = _build(builder, skip=skip, norm="none", **options)
        assert not any(isinstance(m, norm_types) for m in net.modules()), label
        # Only conv weights and the classifier remain.
        for name, module in net.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert isinstance(module, (nn.Conv2d, nn.Linear)), f"{label}: {name}"


# --- init schemes --------------------------------------------------------------------------


def _block_io(net: nn.Module, size: int):
    """Run one forward pass and return (block, input, output) for every residual block."""
    records, handles = [], []
    for m in net.modules():
        if isinstance(m, Block):
            handles.append(m.register_forward_hook(lambda mod, i, o: records.append((mod, i[0].clone(), o.clone()))))
    with torch.no_grad():
        net(torch.randn(2, 3, size, size))
    for h in handles:
        h.remove()
    return records


@pytest.mark.parametrize("init,norm", [
    ("zero_residual", "batch"), ("zero_residual", "none"), ("skipinit", "batch"), ("skipinit", "none"),
    ("fixup", "none"),
])
def test_initially_each_residual_block_computes_relu_of_its_shortcut(init, norm):
    torch.manual_seed(0)
    builds = [
        ("mini", _build("mini", init=init, norm=norm)),
        ("cifar_resnet20", _build("cifar_resnet", depth=20, init=init, norm=norm)),
        ("cifar_resnet20_B", _build("cifar_resnet", depth=20, shortcut="B", init=init, norm=norm)),
        ("resnet18", _build("resnet18", init=init, norm=norm)),
        ("resnet50", _build("resnet50", init=init, norm=norm)),
    ]
    identity_blocks = 0
    for label, net in builds:
        for block, x, y in _block_io(net, 32):
            if block.shortcut is identity_shortcut:
                identity_blocks += 1
                assert torch.equal(y, torch.relu(x)), label
            else:
                with torch.no_grad():
                    assert torch.equal(y, torch.relu(block.shortcut(x))), label
        assert y.abs().sum() > 0, label  # not a dead network
    assert identity_blocks == 2 * (9 - 2) + 8 - 3 + 16 - 4  # those with shortcut = relu(x)


def test_skipinit_adds_one_learnable_zero_scalar_per_block():
    net = models.resnet18(num_classes=10, init="skipinit")
    scales = {n: p for n, p in net.named_parameters() if n.endswith(".scale")}
    assert len(scales) == 8
    assert all(p.shape == () and p.item() == 0.0 and p.requires_grad for p in scales.values())
    nn.functional.cross_entropy(net(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    # alpha = 0 blocks the branch's own gradient at step 0; alpha itself learns.
    assert all(p.grad.abs() > 0 for p in scales.values())
    assert not net.layer2[1].conv1.weight.grad.any()


@pytest.mark.parametrize("builder,options,branches,layers_per_branch", [
    ("cifar_resnet", {"depth": 20}, 9, 2),
    ("resnet50", {}, 16, 3),
])
def test_fixup_scales_branches_and_zeroes_last_layers(builder, options, branches, layers_per_branch):
    torch.manual_seed(0)
    he = _build(builder, norm="none", init="kaiming", **options)
    torch.manual_seed(0)
    fixup = _build(builder, norm="none", init="fixup", **options)
    factor = branches ** (-1.0 / (2 * layers_per_branch - 2))
    blocks = [(a, b) for a, b in zip(he.modules(), fixup.modules()) if isinstance(b, Block)]
    assert len(blocks) == branches
    for a, b in blocks:
        convs_a, convs_b = a.branch_convs(), b.branch_convs()
        for ca, cb in zip(convs_a[:-1], convs_b[:-1]):
            torch.testing.assert_close(cb.weight, ca.weight * factor)
        assert not convs_b[-1].weight.any()
        assert b.scale.item() == 1.0
        assert all(getattr(b, n).item() == 0.0 for n in b.fixup_bias_names)
    assert not fixup.fc.weight.any() and not fixup.fc.bias.any()
    assert fixup.bias1.item() == 0.0 and fixup.bias2.item() == 0.0
    extra = sum(p.numel() for p in fixup.parameters()) - sum(p.numel() for p in he.parameters())
    assert extra == branches * (2 * layers_per_branch + 1) + 2


def _fixup_reference(block: Block, x: torch.Tensor) -> torch.Tensor:
    """A Fixup block written from Zhang et al. 2019 (Fig. 1 and the authors' reference code),
    with the block's own parameters but none of its code: every conv gets a scalar bias in
    front, every activation a scalar bias in front, the branch ends in ``scale * out + bias``;
    the identity shortcut adds the raw ``x``, a downsampling shortcut sees ``x + bias1a``."""
    convs = block.branch_convs()
    n = len(convs)
    out = x
    for i, conv in enumerate(convs, start=1):
        out = F.conv2d(out + getattr(block, f"bias{i}a"), conv.weight, stride=conv.stride, padding=conv.padding)
        if i < n:
            out = F.relu(out + getattr(block, f"bias{i}b"))
    out = out * block.scale + getattr(block, f"bias{n}b")
    if block.shortcut is identity_shortcut:
        identity = x
    elif isinstance(block.shortcut, ZeroPadShortcut):
        sub = (x + block.bias1a)[:, :, :: block.shortcut.stride, :: block.shortcut.stride]
        identity = torch.cat([sub, torch.zeros_like(sub[:, : block.shortcut.extra_channels])], dim=1)
    else:
        proj = block.shortcut[0]
        identity = F.conv2d(x + block.bias1a, proj.weight, stride=proj.stride)
    return F.relu(out + identity)


@pytest.mark.parametrize("block_cls,shortcut", [
    (BasicBlock, "A"),   # identity and zero-pad (the CIFAR ResNets)
    (BasicBlock, "B"),   # identity and projection
    (Bottleneck, "B"),   # identity and projection (ResNet-50)
])
def test_trained_fixup_blocks_match_the_papers_equations(block_cls, shortcut):
    """At init every Fixup scalar bias is 0 and the scale 1, so a wrong placement of a bias is
    invisible; give them all distinct non-zero values (as training does) and compare every
    block with the reference written from the paper's equations."""
    torch.manual_seed(0)
    # A downsampling block (stride 2, wider) followed by an identity block, as in a stage.
    stage = make_stage(block_cls, 16, 16, 2, stride=2, skip=True, shortcut=shortcut, norm_layer=nn.Identity)
    g = torch.Generator().manual_seed(1)
    for block in stage:
        block.fixup_init(num_branches=len(stage))
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 0 else 0.1))
    kinds = set()
    x = torch.randn(2, 16, 8, 8, generator=g)
    with torch.no_grad():
        plain_run = stage(x.clone())
        # The paths probe reroutes gradients through Block.shortcut_term; values must not move.
        for chosen in (["0"], ["1"], ["0", "1"]):
            with paths.routed(stage, chosen):
                torch.testing.assert_close(stage(x.clone()), plain_run)
    for block in stage:
        kinds.add("identity" if block.shortcut is identity_shortcut else type(block.shortcut).__name__)
        with torch.no_grad():
            y = block(x.clone())
            torch.testing.assert_close(y, _fixup_reference(block, x), rtol=1e-5, atol=1e-5)
            # With the branch deleted (scale 0, last bias 0) the block is relu(shortcut path),
            # what the lesion probe's stand-in computes; for the identity that is relu(x).
            last_bias = getattr(block, block.fixup_bias_names[-1])
            block.scale.zero_()
            last_bias.zero_()
            torch.testing.assert_close(block(x.clone()), lesion.DeletedBranch(block)(x.clone()))
            if block.shortcut is identity_shortcut:
                torch.testing.assert_close(block(x.clone()), torch.relu(x))
        x = y
    assert kinds == {"identity", "ZeroPadShortcut" if shortcut == "A" else "Sequential"}, kinds


def test_default_and_kaiming_inits():
    default = models.resnet18(num_classes=10)
    kaiming = models.resnet18(num_classes=10, init="kaiming")
    for (name, d), (_, k) in zip(default.named_modules(), kaiming.named_modules()):
        if isinstance(d, nn.Conv2d):
            fan_in, fan_out = d.weight[0].numel(), d.weight[:, 0].numel()
            # PyTorch's own: kaiming_uniform_(a=sqrt(5)), bounded by 1/sqrt(fan_in).
            assert d.weight.abs().max() <= fan_in**-0.5, name
            # torchvision's: He-normal with fan_out.
            if k.weight.numel() > 10_000:
                assert abs(k.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.05, name


# --- module order ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mini", "cifar_resnet", "resnet18", "resnet50"])
def test_named_modules_are_in_forward_order(name):
    net = _build(name).eval()
    leaves = [n for n, m in net.named_modules() if not any(True for _ in m.children())]
    called, handles = [], []
    for n, m in net.named_modules():
        if n in leaves:
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: called.append(n) if n not in called else None))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    assert called == leaves


# --- refusals, with the message a user sees --------------------------------------------------


# The model group's declared options (models/options.py), checked as the command line checks them;
# the builders take checked values.
@pytest.mark.parametrize("builder,options,message", [
    ("cifar_resnet", dict(depth=21),
     "model.depth=21 must be 6n+2 >= 8; the paper's: 20, 32, 44, 56, 110, 1202; e.g. model.depth=20"),
    ("cifar_resnet", dict(depth=2), "model.depth=2 must be 6n+2 >= 8"),
    ("cifar_resnet", dict(depth="20"), "model.depth='20' must be 6n+2 >= 8"),
    ("resnet50", dict(skip="maybe"), "model.skip='maybe' must be true or false; e.g. model.skip=true"),
    ("mini", dict(skip=1), "model.skip=1 must be true or false"),
    ("resnet18", dict(norm="layer"), "model.norm='layer' is not one of: batch, none; e.g. model.norm=batch"),
    ("resnet18", dict(init="xavier"),
     "model.init='xavier' is not one of: default, kaiming, zero_residual, fixup, skipinit; e.g. model.init=default"),
    ("resnet18", dict(stem="tiny"), "model.stem='tiny' is not one of: imagenet, cifar"),
    ("cifar_resnet", dict(shortcut="C"), "model.shortcut='C' is not one of: A, B"),
    ("resnet18", dict(depth=20), "model.depth is not a key of model skipstudy.models.resnet18; "
                                            "valid: init, norm, skip, stem"),
    ("resnet50", dict(skip=False, init="zero_residual"),
     "model.init=zero_residual needs model.skip=true: without a shortcut a zeroed branch makes every block "
     "output a constant; use model.init=default or model.init=kaiming"),
    ("cifar_resnet", dict(skip=False, init="skipinit"), "model.init=skipinit needs model.skip=true"),
    ("mini", dict(skip=False, norm="none", init="fixup"), "model.init=fixup needs model.skip=true"),
    ("resnet18", dict(init="fixup"),
     "model.init=fixup needs model.norm=none (got model.norm=batch): Fixup replaces normalisation layers; "
     "with batch norm use model.init=zero_residual"),
])
def test_refusals_name_the_key_the_value_and_the_fix(builder, options, message):
    with pytest.raises(ConfigError) as info:
        config.check_group("model", f"skipstudy.models.{builder}", options)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("name,options,size,factor", [
    ("resnet50", {}, 8, 32), ("resnet18", {"stem": "cifar"}, 4, 8), ("cifar_resnet", {}, 2, 4), ("mini", {}, 1, 2),
])
def test_check_input_size_refuses_images_smaller_than_the_downsampling(name, options, size, factor):
    net = _build(name, **options)
    assert net.downsample_factor == factor
    models.check_input_size(net, factor)
    with pytest.raises(ConfigError) as info:
        models.check_input_size(net, size)
    assert str(info.value).startswith(
        f"dataset.image_size={size} is too small for {net.arch} (downsamples by {factor}); use >= {factor}"
    )


def test_check_input_size_message_for_resnet50():
    with pytest.raises(ConfigError) as info:
        models.check_input_size(models.resnet50(10), 8)
    assert str(info.value) == (
        "dataset.image_size=8 is too small for resnet50 (downsamples by 32); use >= 32 or model.stem=cifar"
    )


# -- a user's own data module and network -----------------------------------------------------

class OwnData:
    """A data module of the user's own, without a ``seed`` argument."""

    num_classes, channels, image_size = 4, 1, 8

    def __init__(self, size: int = 8) -> None:
        self.image_size = size

    def prepare_data(self) -> None:
        pass


def own_net(num_classes: int, in_channels: int) -> nn.Module:
    """A network of the user's own, without ``arch`` or ``downsample_factor``."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def test_a_users_own_data_module_and_network_are_built_as_they_are():
    from skipstudy.runs.build import build_datamodule, build_network

    cfg = OmegaConf.create({"seed": 3, "dataset": {"_target_": "test_models.OwnData", "size": 2},
                            "model": {"_target_": "test_models.own_net"}})
    dm = build_datamodule(cfg)
    assert isinstance(dm, OwnData) and dm.image_size == 2  # no seed passed to a class without one
    net = build_network(cfg, dm)
    assert net(torch.zeros(2, 1, 2, 2)).shape == (2, 4)
    # Skipstudy's own networks are still checked against the image size.
    with pytest.raises(ConfigError, match=r"dataset.image_size=2 is too small for resnet18 \(downsamples by 32\)"):
        models.check_input_size(models.resnet18(num_classes=4), 2)
