"""The lesion and paths probes on blocks that are not skipstudy's, from their block contract
alone: a user's block adding its own input, one whose branch and shortcut share a tensor, and
the refusals where the contract cannot say what to delete or route. torchvision's blocks are
in ``test_block_contract.py``'s parametrised test with skipstudy's."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skipstudy.errors import ConfigError
from skipstudy.probes import lesion, paths
from test_block_contract import LayerScaleBlock


def test_a_users_own_block_is_deleted_and_routed_from_its_contract():
    """LayerScaleBlock adds its own input (identity, no shortcut module, nothing after): deleted,
    it is its input; each path's gradient is autograd through the block's equation with the
    part not taken reading a detached copy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LayerScaleBlock(4), LayerScaleBlock(4), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    h = net[0](x).detach()
    assert torch.equal(lesion.DeletedBranch(net[1])(h), h)
    lesion.check(net)
    paths.check(net, None)

    def by_equation(block, z, through_branch, through_shortcut):
        v, u = (z if through_branch else z.detach()), (z if through_shortcut else z.detach())
        return u + block.pw2(F.gelu(block.pw1(block.norm(block.dw(v))))) * block.gamma.view(1, -1, 1, 1)

    names = [n for n, _ in paths.residual_blocks(net)]
    assert names == ["1", "2"]
    for k in range(3):
        for chosen in itertools.combinations(range(2), k):
            got = paths.path_gradient_norms(net, [(x, y)], [names[i] for i in chosen])
            leaf = net[0](x).detach().requires_grad_()
            z = leaf
            for i in range(2):
                z = by_equation(net[1 + i], z, i in chosen, i not in chosen)
            loss = F.cross_entropy(net[5](net[4](net[3](z))), y, reduction="sum")
            want = torch.autograd.grad(loss, leaf)[0].flatten(1).norm(dim=1)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert not any(m._forward_pre_hooks for m in net.modules())  # routing leaves no hook behind


class SharedPreAct(nn.Module):
    """He et al. 2016b's projection block written by a user: branch and shortcut both read
    ``relu(bn1(x))``, declared ``shared=True``, with no ``without_branch``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.conv1, self.proj = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, 2, 1), nn.Conv2d(4, 8, 1, 2)

    def block_contract(self):
        from skipstudy.models.contract import BlockContract

        return BlockContract(self.conv1, self.conv1, "projection", self.proj, shared=True, after="none")

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        return self.conv1(pre) + self.proj(pre)


class EntryAfterStem(LayerScaleBlock):
    """Declares ``dw`` as its entry but feeds it ``2 * x``: the identity route cannot be swapped."""

    def forward(self, x):
        return x + self.drop_path(self.pw2(F.gelu(self.pw1(self.norm(self.dw(2 * x))))))


def test_lesion_and_paths_refuse_what_the_contract_cannot_route():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SharedPreAct(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))
    with pytest.raises(ConfigError, match=r"^probe=lesion: block 1 \(SharedPreAct\) declares shared=True .*"
                                          r"give the class a without_branch\(x\) method$"):
        lesion.check(net)
    paths.check(net, None)  # both parts read the shared tensor through hooked modules: routable
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    block = net[1]
    for through_branch in (False, True):
        got = paths.path_gradient_norms(net, [(x, y)], ["1"] if through_branch else [])
        leaf = net[0](x).detach().requires_grad_()
        pre = F.relu(block.bn1(leaf))
        z = block.conv1(pre if through_branch else pre.detach()) + block.proj(pre.detach() if through_branch else pre)
        loss = F.cross_entropy(net[4](net[3](net[2](z))), y, reduction="sum")
        want = torch.autograd.grad(loss, leaf)[0].flatten(1).double().norm(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), EntryAfterStem(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"^probe=paths: the branch entry Conv2d of EntryAfterStem does not read"):
        paths.path_gradient_norms(net, [(x, y)], ["1"])


def test_lesion_and_paths_run_on_torchvision_resnet18(tmp_path):
    """Both probes end to end (records, figures) on torchvision's own ResNet-18: its eight
    blocks found from their contract, each deletion's accuracy equal to the net with that block
    replaced by ``relu(downsample(x) or x)`` by hand, the full gradient equal to autograd's."""
    import json

    import torchvision
    from omegaconf import OmegaConf

    from conftest import group_option
    from skipstudy.data.synthetic import SyntheticDataModule
    from skipstudy.probes.context import ProbeContext

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    dm = SyntheticDataModule(num_classes=4, image_size=16, num_train=8, num_val=8, batch_size=4)
    dm.setup("fit")
    ctx = ProbeContext(net=net, datamodule=dm, run_dir=tmp_path, batches=2, trained=True)
    opts = {name: OmegaConf.merge(group_option("probe", name, "probe"), {"samples": 1, "batches": 2})
            for name in ("lesion", "paths")}
    lesion.run(ctx, opts["lesion"])
    record = json.loads((tmp_path / "probes" / "lesion" / "lesion_step0.json").read_text())
    names = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [b["name"] for b in record["blocks"]] == names
    assert [b["downsampling"] for b in record["blocks"]] == [False, False, True, False, True, False, True, False]
    batches = ctx.fixed_batches("val")
    for b in record["blocks"]:
        block = net.get_submodule(b["name"])
        by_hand = block.register_forward_hook(
            lambda m, a, o: F.relu(a[0] if m.downsample is None else m.downsample(a[0])))
        with torch.no_grad():
            acc = sum(int((net(x).argmax(1) == y).sum()) for x, y in batches) / 8
        by_hand.remove()
        assert b["acc"] == acc
    result = paths.run(ctx, opts["paths"])
    assert result["blocks"] == 8 and 0 <= result["mean_length"] <= 8
    leaf = {}

    def first_input(_m, args):
        leaf["x"] = args[0].detach().requires_grad_()
        return (leaf["x"],)

    full = []
    for x, y in ctx.fixed_batches("train"):
        with net.layer1[0].register_forward_pre_hook(first_input):
            loss = F.cross_entropy(net(x), y, reduction="sum")
        full.append(torch.autograd.grad(loss, leaf["x"])[0].flatten(1).double().norm(dim=1))
    assert math.isclose(result["grad_full"], float(torch.cat(full).mean()), rel_tol=1e-5)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
