"""The architecture rules, checked by walking the imports of every module.

- llmb.story and llmb.assistant never import each other or llmb.app;
- inference (sampling, loading, chatting) never imports training;
- settings and config modules import no torch, so the app can build its forms before torch loads;
- no import circle: a module never imports, directly or through others, a module that imports it;
- an app tab (llmb/app/*_tab.py) imports neither the page nor another tab;
- the story model's functions fit on a screen;
- no file edits sys.path: the package is installed (pyproject.toml) or run from the checkout.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llmb"
INFERENCE = ["llmb.story.model", "llmb.story.sample", "llmb.story.fast_decode", "llmb.story.checkpoint",
             "llmb.story.tokenizer", "llmb.assistant.engine", "llmb.assistant.loading"]
TRAINING = ["llmb.story.train", "llmb.story.lr_finder", "llmb.story.schedule", "llmb.story.batches",
            "llmb.assistant.train"]
NO_TORCH = ["llmb.settings", "llmb.story.config", "llmb.assistant.config", "llmb.folders", "llmb.errors",
            "llmb.fileio", "llmb.runlog", "llmb.app.config"]


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """Every module a file imports, at the top or inside a function (absolute names; relative ones resolved)."""
    found = set()
    package = module_name(path).split(".")[:None if path.name == "__init__.py" else -1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] if node.level else [])
            module = ".".join(filter(None, (base, node.module)))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module, prefix):
    return sorted(name for name in MODULES[module] if name == prefix or name.startswith(prefix + "."))


def test_the_walk_sees_the_packages():
    assert {"llmb.story.train", "llmb.assistant.engine", "llmb.app.config", "llmb.settings"} <= set(MODULES)


@pytest.mark.parametrize("part, others", [("llmb.story", ["llmb.assistant", "llmb.app"]),
                                          ("llmb.assistant", ["llmb.story", "llmb.app"])])
def test_story_and_assistant_are_independent(part, others):
    for module in (m for m in MODULES if m.startswith(part)):
        for other in others:
            assert not imported(module, other), f"{module} imports {imported(module, other)}"


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_imports_training(module):
    for training in TRAINING:
        assert not imported(module, training), f"{module} imports {training}"


@pytest.mark.parametrize("module", NO_TORCH)
def test_settings_and_configs_name_no_heavy_library(module):
    for heavy in ("torch", "transformers", "peft", "gradio", "bitsandbytes"):
        assert not imported(module, heavy), f"{module} imports {imported(module, heavy)}"


def test_settings_and_configs_load_without_torch():
    code = "import sys; import " + ", ".join(NO_TORCH) + \
        "; print(sorted(m for m in ('torch', 'transformers', 'peft', 'gradio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def edits_sys_path(node):
    """Is `node` a call such as sys.path.insert(...) or sys.path.append(...)?"""
    f = getattr(node, "func", None)
    return isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) and f.value.attr == "path" \
        and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys"


def import_graph(modules):
    """Each of `modules` -> the modules of llmb it imports (its own parent packages left out: Python has
    begun importing them before it runs the module)."""
    def is_parent(name, module):
        return module.startswith(name + ".")

    return {m: {n for n in MODULES[m] if n in modules and n != m and not is_parent(n, m)} for m in modules}


def import_circles(graph):
    """Every circle of `graph` ({module: modules it imports}), one per group of modules that reach each
    other, as the list of modules along it, back to the first."""
    def reach(start):
        seen, todo = {start}, [start]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        return seen

    reachable = {m: reach(m) for m in graph}
    circles, done = [], set()
    for m in sorted(graph):
        group = {n for n in reachable[m] if m in reachable[n]}  # the modules m reaches and is reached from
        if m in done or (len(group) == 1 and m not in graph[m]):
            continue
        done |= group
        path, here = [m], m  # walk back to m inside the group, always to the nearest step home
        while True:
            here = min((n for n in graph[here] if n in group), key=lambda n: (distance(graph, n, m), n))
            path.append(here)
            if here == m:
                break
        circles.append(path)
    return circles


def distance(graph, start, goal):
    """Imports from start to goal along graph (breadth first); 0 when start is goal."""
    frontier, seen, steps = {start}, {start}, 0
    while goal not in frontier:
        frontier = {n for f in frontier for n in graph[f]} - seen
        seen |= frontier
        steps += 1
        if not frontier:
            return float("inf")
    return steps


def test_the_circle_finder_finds_circles_and_only_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert import_circles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []
    assert import_graph(["llmb.story.train", "llmb.story.model"]) == {"llmb.story.train": {"llmb.story.model"},
                                                                      "llmb.story.model": set()}


def in_app(module):
    return module.startswith("llmb.app.")


def test_no_import_circle_outside_the_app():
    circles = [c for c in import_circles(import_graph(MODULES)) if not all(map(in_app, c))]
    assert not circles, "import circle(s): " + "; ".join(" -> ".join(c) for c in circles)


def test_no_import_circle_anywhere():
    circles = import_circles(import_graph(MODULES))
    assert not circles, "import circle(s): " + "; ".join(" -> ".join(c) for c in circles)


TABS = sorted(m for m in MODULES if m.startswith("llmb.app.") and m.endswith("_tab"))


def test_the_app_has_its_tabs():
    assert {"llmb.app.story_tab", "llmb.app.chat_tab", "llmb.app.train_tab"} <= set(TABS)


@pytest.mark.parametrize("tab", TABS)
def test_a_tab_imports_neither_the_page_nor_another_tab(tab):
    """What tabs share lives in llmb.app.common; the page builds the tabs and wires them together."""
    for other in ["llmb.app.page", *(t for t in TABS if t != tab)]:
        assert not imported(tab, other), f"{tab} imports {imported(tab, other)}"


LONGEST_FUNCTION = 50  # lines; a longer one says why in its docstring ("long because ...")


def test_story_functions_are_short_enough_to_read_at_once():
    too_long = []
    for path in sorted((PACKAGE / "story").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION and "long because" not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert not too_long, too_long


def test_no_file_edits_sys_path():
    files = [*REPO.glob("*.py"), *(p for d in ("llmb", "training", "benchmarks", "tests") for p in (REPO / d).rglob("*.py"))]
    assert len(files) > 30
    for path in files:
        assert not any(edits_sys_path(n) for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))), path


def test_console_script_and_module_run_the_same_cli():
    for cmd in (["llmb", "--help"], [sys.executable, "-m", "llmb", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO / "tests")
        assert out.returncode == 0 and "sample" in out.stdout and "chat" in out.stdout, out.stderr
