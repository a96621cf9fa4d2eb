"""The one-way flow in the code: module dependencies, settings, hooks that never leak, eval-mode capture."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import cna_fast
from cna_fast import CaptureSettings, discover, get_adapter
from cna_fast.circuit import Circuit
from cna_fast.errors import CNAError
from cna_fast.hooks import HookSet
from cna_fast.models.fused import patched_scale
from cna_fast.pipeline import run_identity
from cna_fast.steering import AddDirections, Steering
from tests.conftest import NEGATIVE, POSITIVE
from tests.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cna_fast"


# The stages in the order they may import each other: a module may import its own stage and the stages
# before it, never one after it. Folders are stages; the root modules are the small shared pieces.
STAGES = [
    "cna_fast._version",
    "cna_fast.errors",
    "cna_fast._io",
    "cna_fast.hooks",
    "cna_fast.kernels",
    "cna_fast.paths",
    "cna_fast.prompts",
    "cna_fast.models",
    "cna_fast.batching",
    "cna_fast.settings",
    "cna_fast.stats",
    "cna_fast.capture",
    "cna_fast.circuit",
    "cna_fast.attribution",
    "cna_fast.pipeline",
    "cna_fast.steering",
    "cna_fast.evaluation",
    "cna_fast.search",
    "cna_fast.export",
    "cna_fast.jobs",
    "cna_fast.cli",
    "cna_fast",  # the package root (the public names) and __main__
]
STAGE_FOLDERS = ["kernels", "models", "stats", "capture", "circuit", "attribution", "steering", "evaluation", "search",
                 "export", "jobs", "cli"]
MAX_ROOT_MODULES = 12


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imported_modules(path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """The cna_fast modules `path` imports anywhere in it (function-level imports count), relative imports resolved.

    `from .x import name` is an import of module `x.name` when that is a module of the package, else of `x`.
    """
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                names.add(submodule if known is None or submodule in known else module)
            if known is None:
                names.add(module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("cna_fast")}


def _import_graph() -> dict[str, set[str]]:
    return {name: {other for other in _imported_modules(path, MODULES) if other != name}
            for name, path in MODULES.items()}


def _stage(module: str) -> int:
    if module in ("cna_fast", "cna_fast.__main__"):
        return len(STAGES) - 1
    return max(index for index, stage in enumerate(STAGES[:-1]) if module == stage or module.startswith(stage + "."))


def test_every_module_belongs_to_a_stage():
    for module in MODULES:
        assert _stage(module) is not None, module
    assert sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").is_file()) \
        == sorted(STAGE_FOLDERS)


def test_no_module_imports_a_later_stage():
    """Function-level imports count: every arrow points to the module's own stage or an earlier one."""
    backwards = [f"{module} -> {other}" for module, imported in _import_graph().items() for other in imported
                 if _stage(other) > _stage(module)]
    assert not backwards


def test_no_import_circle():
    """No circle among the modules, function-level imports counted (a package's __init__ is a module)."""
    graph, state, circles = _import_graph(), {}, []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                circles.append(" -> ".join(trail[trail.index(other):] + [other]) if other in trail else other)
            elif other not in state:
                visit(other, trail + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles


def test_the_root_holds_few_modules():
    root = sorted(path.name for path in PACKAGE.glob("*.py") if path.name not in ("__init__.py", "__main__.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_no_module_getattr_and_no_deprecated_alias():
    """No lazy module `__getattr__` shim, and no name kept only to warn that it moved."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert "__getattr__" not in functions, path
        assert "DeprecationWarning" not in path.read_text(), path


def test_no_name_hides_a_module():
    """A package's public name is never also the name of one of its modules (`import a.b as m` gives the module)."""
    hidden = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        package = importlib.import_module(module)
        for child in (other for other in MODULES if other.rsplit(".", 1)[0] == module and other != module):
            value = getattr(package, child.rsplit(".", 1)[1], None)
            if value is not None and not isinstance(value, types.ModuleType):
                hidden.append(child)
    assert not hidden


def test_the_version_is_written_once():
    assert cna_fast.__version__ == importlib.import_module("cna_fast._version").__version__
    assert not re.search(r"^version\s*=\s*\"", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    sources = [path for path in PACKAGE.rglob("*.py") if "__version__ = " in path.read_text()]
    assert sources == [PACKAGE / "_version.py"]


def test_each_stage_makes_the_dense_or_moe_choice_in_its_entry_point():
    """Only a stage's __init__ (and the variant's own module) names its mixture-of-experts variant."""
    variants = {"MoECapturer": "capture", "MoESteering": "steering", "moe.columns": "attribution",
                "MoEStats.load": "stats", "MoEAdapter(model)": "models"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # code only: docstrings and comments may name them
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
                node.body = node.body[1:] or [ast.Pass()]
        code = ast.unparse(tree)
        for variant, stage in variants.items():
            if variant in code:
                assert path.parent == PACKAGE / stage and path.name in ("__init__.py", "moe.py"), (variant, path)


def test_attribution_is_pure():
    """attribution imports nothing from capture, models or steering: statistics in, circuit out."""
    forbidden = ("cna_fast.capture", "cna_fast.models", "cna_fast.steering", "cna_fast.pipeline")
    for path in (PACKAGE / "attribution").glob("*.py"):
        imported = _imported_modules(path)
        assert not [name for name in imported if name.startswith(forbidden)], (path, imported)


def test_kernels_depend_on_torch_and_triton_only():
    for path in (PACKAGE / "kernels").glob("*.py"):
        outside = [name for name in _imported_modules(path) if not name.startswith("cna_fast.kernels")]
        assert not outside, f"{path.name} imports {outside}"


def test_benchmarks_use_public_names_only_and_import():
    for path in (ROOT / "benchmarks").glob("*.py"):
        private = [name for name in _imported_modules(path) if any(part.startswith("_") and part != "__init__"
                                                                   for part in name.split("."))]
        assert not private, f"{path.name} imports {private}"
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)
                assert owner not in ("capturer", "recorder", "cna_fast"), f"{path.name}: {owner}.{node.attr}"
        for node in ast.walk(ast.parse(text)):  # every cna_fast name a benchmark imports exists
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cna_fast"):
                module = importlib.import_module(node.module)
                missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                assert not missing, f"{path.name}: {node.module} has no {missing}"


def test_functions_and_classes_are_short_unless_a_comment_says_why():
    """No function over ~60 lines and no class over ~150, unless a comment right above says why ("Longer than")."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            limit = 150 if isinstance(node, ast.ClassDef) else 60
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            above = first - 2
            while above >= 0 and lines[above].lstrip().startswith("#") and "longer than" not in lines[above].lower():
                above -= 1
            explained = above >= 0 and "longer than" in lines[above].lower()
            if node.end_lineno - node.lineno + 1 > limit and not explained:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not too_long


def test_docs_and_tests_stay_inside_the_repository():
    """A fresh clone has no folder beside it: nothing points to the workspace's shared folder."""
    outside = ("../" + "shared", "/" + "shared/data")  # spelled in two parts, so that this file passes too
    for path in [ROOT / "README.md", ROOT / "docs" / "architecture.md", *PACKAGE.rglob("*.py"),
                 *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        text = path.read_text()
        assert not any(place in text for place in outside), path
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_architecture_doc_has_one_line_per_folder():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for folder in STAGE_FOLDERS:
        assert f"`{folder}/`" in doc, folder


def _hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def _patched_mlps(model: nn.Module) -> list[int]:
    adapter = get_adapter(model)
    return [layer for layer in range(adapter.num_layers) if "forward" in adapter.mlp(layer).__dict__]


def _circuit(model: nn.Module, layers: list[int], neurons: list[int]) -> Circuit:
    count = len(layers)
    return Circuit(layers=torch.tensor(layers), neurons=torch.tensor(neurons), scores=torch.ones(count),
                   deltas=torch.ones(count), mean_positive=torch.ones(count), mean_negative=torch.zeros(count),
                   std_positive=torch.ones(count), std_negative=torch.ones(count),
                   meta={"architecture": get_adapter(model).architecture()})


def test_failed_add_directions_leaves_no_hooks(tiny_llama):
    """The old leak: hooks for layers 0 and 1 were registered before layer 99 was refused."""
    directions = torch.ones(3, tiny_llama.config.hidden_size)
    with pytest.raises(CNAError, match="layer 99"):
        AddDirections(tiny_llama, torch.tensor([0, 1, 99]), directions, 1.0)
    with pytest.raises(CNAError, match="one direction per layer"):
        AddDirections(tiny_llama, torch.tensor([0, 1]), directions, 1.0)
    assert _hook_count(tiny_llama) == 0


def test_steering_that_fails_halfway_leaves_no_hooks_or_patches(tiny_llama, monkeypatch):
    """A fused steering patches layer 0, then finds layer 2 already patched: everything it did is undone."""
    monkeypatch.setenv("CNA_FAST_BACKEND", "triton")  # the tests run Triton under its interpreter
    width = get_adapter(tiny_llama).widths[2]
    with patched_scale(tiny_llama, {2: torch.ones(width)}):
        with pytest.raises(CNAError, match="already runs a fused forward"):
            Steering(tiny_llama, _circuit(tiny_llama, [0, 2], [1, 3]), multipliers=torch.tensor([[0.0], [2.0]]))
        assert _hook_count(tiny_llama) == 0
        assert _patched_mlps(tiny_llama) == [2]  # only the outer patch, still in place
    assert _patched_mlps(tiny_llama) == []


def test_hook_set_undoes_everything_when_building_fails(tiny_llama):
    adapter = get_adapter(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"):
        with HookSet.building() as hooks:
            hooks.pre_hook(adapter.neuron_site(0), lambda module, args: None)
            hooks.post_hook(adapter.neuron_site(1), lambda module, args, output: None)
            hooks.replace_forward(adapter.mlp(3), lambda x: x)
            raise RuntimeError("boom")
    assert _hook_count(tiny_llama) == 0 and _patched_mlps(tiny_llama) == []


def test_bogus_backend_exits_2_with_one_line_before_loading(model_dir, prompt_files, tmp_path):
    for value in ("bogus", "cuda-please"):
        env = {**os.environ, "CNA_FAST_BACKEND": value, "PYTHONPATH": str(ROOT)}
        result = subprocess.run([sys.executable, "-m", "cna_fast", "discover", "--positive", str(prompt_files[0]),
                                 "--negative", str(prompt_files[1]), "--model", str(tmp_path / "no-such-model"),
                                 "--out", str(tmp_path / "c.safetensors"), "--quiet"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "CNA_FAST_BACKEND" in lines[0] and value in lines[0], result.stderr
        assert not (tmp_path / "c.safetensors").exists()


ALTERNATIVES = {"layers": (0, 1), "reduction": "mean", "chat_template": False, "batch_size": 7,
                "padding_side": "left", "prefix_cache": False, "max_length": 99, "on_long": "error",
                "moe_mode": "conditional"}


def test_checkpoint_identity_changes_with_every_capture_setting(tiny_llama, tokenizer):
    assert set(ALTERNATIVES) == {field.name for field in dataclasses.fields(CaptureSettings)}
    base = run_identity(tiny_llama, tokenizer, POSITIVE, NEGATIVE, CaptureSettings())
    for name, value in ALTERNATIVES.items():
        changed = run_identity(tiny_llama, tokenizer, POSITIVE, NEGATIVE, CaptureSettings(**{name: value}))
        assert changed != base, name
    template = CaptureSettings(chat_template="{{ messages[0]['content'] }}")
    assert run_identity(tiny_llama, tokenizer, POSITIVE, NEGATIVE, template) != base


def test_settings_are_validated_once_with_clear_errors():
    for options, pattern in [({"reduction": "first"}, "unknown reduction"), ({"batch_size": 0}, "batch_size"),
                             ({"padding_side": "middle"}, "padding side"), ({"max_length": 0}, "max_length"),
                             ({"on_long": "crash"}, "on_long"), ({"layers": "0,1"}, "list of layer numbers"),
                             ({"chat_template": 3}, "chat_template")]:
        with pytest.raises(CNAError, match=pattern):
            CaptureSettings(**options)
    with pytest.raises(CNAError, match="unknown option"):
        CaptureSettings.build(batchsize=3)
    with pytest.raises(CNAError, match="unknown option.*position"):
        CaptureSettings.build(position="mean")  # the old name of `reduction` is gone


def test_capture_runs_in_eval_mode_and_restores_the_callers_mode(tokenizer):
    """Dropout would randomize a circuit found in train mode; capture switches to eval and back."""
    model = build_tiny_model("llama", len(tokenizer), attention_dropout=0.5)
    expected = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=8, progress=False)
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back exactly
    first = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=8, progress=False)
    second = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=8, progress=False)
    for found in (first, second):
        assert torch.equal(found.neurons, expected.neurons) and torch.equal(found.scores, expected.scores)
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training
    with torch.no_grad():  # and dropout really is active in train mode, so the test can fail
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_discover_rejects_sloppy_python_inputs(tiny_llama, tokenizer):
    """A string is not a prompt set, and exclude_layers takes a list: clear errors instead of odd results."""
    cases = [(("zebra stripes", NEGATIVE), {}, "positive prompts must be a list"),
             ((POSITIVE, b"bytes"), {}, "negative prompts must be a list"),
             ((POSITIVE, NEGATIVE), {"exclude_layers": 5}, "exclude_layers must be a list"),
             ((POSITIVE, NEGATIVE), {"universal_filter": "yes"}, "universal_filter must be"),
             ((POSITIVE, NEGATIVE), {"exclude_layers": [0, 1, 2, 3]}, "every layer is excluded")]
    for (positive, negative), options, pattern in cases:
        with pytest.raises(CNAError, match=pattern):
            discover(tiny_llama, tokenizer, positive, negative, top_k=3, progress=False, **options)


def test_readme_layout_lists_every_module():
    """The README's Layout names every module of the package (kernels/ as one entry), in stage order."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ")] if "\n## " in layout else layout
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py") or relative.startswith("cna_fast/kernels/"):
            continue
        assert relative in layout, f"README Layout does not list {relative}"
    assert "cna_fast/kernels/" in layout
