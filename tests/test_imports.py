"""The package's import graph has no cycles: no module imports one that imports it back,
directly or through others, counting imports inside functions too (a lazy import hides a
cycle, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in (SRC / "skipstudy").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("skipstudy"):
                # `from pkg import submodule` depends on the submodule, `from mod import name` on mod.
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("skipstudy")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert {"skipstudy.train", "skipstudy.runs.resume", "skipstudy.runs.dirs", "skipstudy.probes.callback"} <= graph.keys()
    assert "skipstudy.runs.layout" in graph["skipstudy.runs.resume"]  # the graph sees real edges
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_package_registers_nothing_with_hydra_or_omegaconf():
    """Entry points register what Hydra needs (skipstudy.overrides.register); an import does not,
    so a user's own Hydra app that imports skipstudy composes as it would without it."""
    import subprocess
    import sys

    code = (
        "import pkgutil, importlib, skipstudy\n"
        "for m in pkgutil.walk_packages(skipstudy.__path__, 'skipstudy.'): importlib.import_module(m.name)\n"
        "from omegaconf import OmegaConf\n"
        "from hydra.core.config_store import ConfigStore\n"
        "names = ['skipstudy.resume_dir', 'skipstudy.run_name', 'skipstudy.sweep_subdir', 'skipstudy.probe_dir', 'skipstudy.help_groups']\n"
        "print([n for n in names if OmegaConf.has_resolver(n)], 'skipstudy_open_node.yaml' in ConfigStore.instance().list(''))\n"
        "from skipstudy.overrides import register\n"
        "register()\n"
        "print([n for n in names if OmegaConf.has_resolver(n)], 'skipstudy_open_node.yaml' in ConfigStore.instance().list(''))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["[] False", f"{['skipstudy.resume_dir', 'skipstudy.run_name', 'skipstudy.sweep_subdir', 'skipstudy.probe_dir', 'skipstudy.help_groups']} True"]


# Reaches into other libraries' private names still in src/, each with why no public API does it.
# A new one fails the test below; one that goes must leave this list too.
PRIVATE_REACHES = {
    # Exact resume (pending_metrics): a checkpoint is written in on_train_batch_end or
    # on_train_epoch_end, the save points Lightning's restart logic resumes from (lightning 2.6.6
    # loops/training_epoch_loop.py:166-210: saved later, the resumed steps are logged one step
    # early or late), and Lightning writes that step's or epoch's self.log values only after
    # those hooks (training_epoch_loop.py:375-384, fit_loop.py:482-497). Its public views,
    # trainer.logged_metrics and callback_metrics (connectors/logger_connector/logger_connector.py:
    # 246-258), are dicts updated since fit start: they hold earlier steps', the last epoch's and
    # validation's keys, and cannot say which keys that write holds. docs/architecture.md has more.
    ("runs/resume.py", "trainer.fit_loop.epoch_loop._results"),
    # One fused kernel for the norms of many tensors, one norm each: torch 2.14 has no public
    # multi-tensor norm (torch.nn.utils.get_total_norm gives only their total; torch.linalg
    # norms one tensor per op).
    ("runs/stopping.py", "torch._foreach_norm"), ("monitor/sums.py", "torch._foreach_norm"),
    ("monitor/packing.py", "torch._foreach_norm"),
    # The module torch.compile wraps: OptimizedModule exposes it only as _orig_mod, and the
    # monitor names layers as the user's network does (no "_orig_mod." prefix).
    ("monitor/callback.py", "net._orig_mod"), ("monitor/taps.py", "model._orig_mod"),
    # WandbLogger starts a W&B run on the first read of .experiment; only _experiment tells
    # whether this training started one, without starting one to finish it.
    ("runs/loggers.py", "logger._experiment"),
}


def private(name: object) -> bool:
    """One leading underscore and none trailing (Hydra's ``_target_`` keys are public)."""
    return isinstance(name, str) and name.startswith("_") and not name.startswith("__") and not name.endswith("_")


def string_reaches(node: ast.AST) -> list[str]:
    """Private names reached through a string: ``getattr(obj, "_x")`` (also set-, has-, delattr)
    and ``type(name, (cls,), {"_x": ...})``, a subclass overriding a private method, as
    ``obj._x`` and ``cls._x``."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return []
    args = node.args
    if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(args) >= 2 \
            and isinstance(args[1], ast.Constant) and private(args[1].value):
        return [f"{ast.unparse(args[0])}.{args[1].value}"]
    if node.func.id == "type" and len(args) == 3 and isinstance(args[1], ast.Tuple) and isinstance(args[2], ast.Dict):
        bases = " | ".join(ast.unparse(b) for b in args[1].elts)
        return [f"{bases}.{k.value}" for k in args[2].keys if isinstance(k, ast.Constant) and private(k.value)]
    return []


def private_reaches() -> set[tuple[str, str]]:
    """``(file under src/skipstudy or src/hydra_plugins, expression)`` for each attribute of another
    object whose name starts with one underscore, the same reached through a string
    (:func:`string_reaches`), and each import of such a name from a library."""
    found = set()
    for path in SRC.rglob("*.py"):
        where = str(path.relative_to(SRC / path.relative_to(SRC).parts[0]))
        for node in ast.walk(ast.parse(path.read_text())):
            found |= {(where, reach) for reach in string_reaches(node)}
            if isinstance(node, ast.Attribute) and private(node.attr) and not (isinstance(node.value, ast.Name)
                                                                                and node.value.id in ("self", "cls")):
                found.add((where, ast.unparse(node)))
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("skipstudy"):
                for alias in node.names:
                    parts = [*(node.module or "").split("."), alias.name]
                    if any(p.startswith("_") and not p.startswith("__") for p in parts):
                        found.add((where, ".".join(parts)))
    return found


def test_private_names_reached_through_strings_are_found():
    code = ("getattr(net, '_orig_mod', net); setattr(m, '_scale', 1); getattr(m, '_target_'); getattr(m, 'weight')\n"
            "type('Unverified', (datasets.CIFAR10,), {'_check_integrity': f, 'url': u})\n"
            "d = {'_se': 1}")
    reaches = [r for node in ast.walk(ast.parse(code)) for r in string_reaches(node)]
    assert sorted(reaches) == ["datasets.CIFAR10._check_integrity", "m._scale", "net._orig_mod"]


def test_no_new_reach_into_a_librarys_private_names():
    found = private_reaches()
    assert not found - PRIVATE_REACHES, f"new private reaches (use a public API): {sorted(found - PRIVATE_REACHES)}"
    assert not PRIVATE_REACHES - found, f"gone: drop them from PRIVATE_REACHES: {sorted(PRIVATE_REACHES - found)}"
