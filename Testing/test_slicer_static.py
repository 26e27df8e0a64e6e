"""Static checks of the Slicer (Qt) layer, which cannot run without the Slicer application:
the .ui parses, every `self.ui.<name>` exists in it, parameter bindings name real fields, custom
widgets are ones Slicer provides, CMake lists every file, no torch/monai import at module level
on the Slicer side, and everything compiles. These are static checks, not GUI tests."""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "QGSegmentation"
UI = MODULE / "Resources" / "UI" / "QGSegmentation.ui"
MODULE_PY = MODULE / "QGSegmentation.py"
SLICER_SIDE = [MODULE_PY, *sorted((MODULE / "Testing" / "Python").glob("*.py")),
               *sorted((REPO / "QGSegmentationLib" / "slicer").glob("*.py"))]

# Widget classes a Slicer build provides (Qt, CTK, MRML widgets).
SLICER_CUSTOM_WIDGETS = {
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView",
    "qMRMLSubjectHierarchyComboBox", "qMRMLSegmentsTableView", "qMRMLSegmentSelectorWidget",
    "qMRMLSpinBox", "qMRMLSliderWidget", "qMRMLCheckableNodeComboBox", "qMRMLTableView",
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkPathLineEdit", "ctkDirectoryButton",
    "ctkSliderWidget", "ctkDoubleSpinBox", "ctkCheckableComboBox", "ctkComboBox",
    "ctkMenuButton", "ctkRangeWidget", "ctkCheckBox",
}


def ui_tree():
    return ET.parse(UI).getroot()


def ui_widgets():
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def test_ui_parses_and_names_are_unique():
    root = ui_tree()
    assert root.tag == "ui" and root.find("class").text == "QGSegmentation"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names in the .ui"


def test_every_ui_attribute_used_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    used |= set(re.findall(r"widget\.ui\.(\w+)", (MODULE / "Testing" / "Python" / "QGSegmentationWidgetTest.py").read_text()))
    missing = used - set(ui_widgets())
    assert not missing, f"used in Python but not in the .ui: {sorted(missing)}"
    assert len(used) > 30  # the regexes really found the panel's widgets


def test_custom_widgets_are_provided_by_slicer():
    root = ui_tree()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    assert declared <= SLICER_CUSTOM_WIDGETS, declared - SLICER_CUSTOM_WIDGETS
    used = set(ui_widgets().values())
    non_qt = {c for c in used if not c.startswith("Q")}
    assert non_qt <= declared, f"widgets used but not declared as custom widgets: {non_qt - declared}"


def test_panel_sections_in_order():
    layout = ui_tree().find("widget").find("layout")
    sections = [item.find("widget").get("name") for item in layout.findall("item")
                if item.find("widget") is not None]
    assert sections == ["casesCollapsibleButton", "trainingCollapsibleButton", "runCollapsibleButton",
                        "reviewCollapsibleButton", "modelsCollapsibleButton", "environmentCollapsibleButton"]


def _parameter_fields():
    tree = ast.parse(MODULE_PY.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "QGSegmentationParameterNode":
            return {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("QGSegmentationParameterNode not found")


def test_parameter_bindings_name_parameter_node_fields():
    bound = {}
    for widget in ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    fields = _parameter_fields()
    assert set(bound.values()) == fields, (set(bound.values()) ^ fields)
    assert len(bound) == len(set(bound.values())), "two widgets bound to one parameter"


def _cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return [t.replace("${MODULE_NAME}", "QGSegmentation") for t in match.group(1).split()]


def test_module_cmake_lists_every_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_py = sorted(p.relative_to(MODULE).as_posix() for p in MODULE.glob("*.py"))
    on_disk_res = sorted(p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*")
                         if p.is_file())
    assert sorted(scripts) == on_disk_py
    assert sorted(resources) == on_disk_res
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_backend_package_is_shipped_next_to_the_module():
    """The glob in the module CMake picks up every backend .py file (checked by evaluating the
    same patterns here) and every package has its __init__.py."""
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "ctkMacroCompilePythonScript" in text and "NO_INSTALL_SUBDIR" in text
    patterns = re.findall(r"\$\{QGSEGMENTATIONLIB_SOURCE_DIR\}/(QGSegmentationLib/\*\.\w+)", text)
    assert "QGSegmentationLib/*.py" in patterns
    files = [p.relative_to(REPO).as_posix() for p in (REPO / "QGSegmentationLib").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")]
    # GLOB_RECURSE's "dir/*.py" matches at any depth below dir
    uncovered = [f for f in files if not any(fnmatch.fnmatch(f, pat.replace("/*", "/**/*"))
                                                 or fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not uncovered, f"backend files the extension package would miss: {uncovered}"
    for folder in {p.parent for p in (REPO / "QGSegmentationLib").rglob("*.py")}:
        assert (folder / "__init__.py").exists(), f"{folder} lacks __init__.py"


def test_testing_cmake_registers_every_in_slicer_test():
    text = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in (MODULE / "Testing" / "Python").glob("*.py"):
        assert f"/{script.name})" in text, f"{script.name} not registered"
    assert "add_subdirectory(Python)" in (MODULE / "Testing" / "CMakeLists.txt").read_text()


def test_root_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    # the icon and screenshots the Extension Manager shows are files of this repository
    urls = re.findall(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(\S+?)[\s\"]", text)
    assert len(urls) == 3 and all((REPO / url).is_file() for url in urls), urls
    for line in ("project(QGSegmentation)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(QGSegmentation)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, line


@pytest.mark.parametrize("path", [REPO / "QGSegmentation.png", MODULE / "Resources" / "Icons" / "QGSegmentation.png"])
def test_icons_are_128_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


HEAVY = {"torch", "monai"}


def _module_level_imports(tree):
    """Imports executed when the module is imported: top level, and inside top-level if/try."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", [])
            for handler in getattr(node, "handlers", []):
                stack += handler.body


@pytest.mark.parametrize("path", SLICER_SIDE, ids=lambda p: p.name)
def test_no_module_level_torch_or_monai(path):
    tree = ast.parse(path.read_text())
    for node in _module_level_imports(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        assert not any(n.split(".")[0] in HEAVY for n in names), f"{path.name}:{node.lineno}"


def test_slicer_side_never_imports_the_deep_learning_stack_anywhere():
    """Stronger for QGSegmentation.py and QGSegmentationLib/slicer: not even inside functions
    (the Slicer process must never load torch; the worker does)."""
    for path in [MODULE_PY, *(REPO / "QGSegmentationLib" / "slicer").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in HEAVY for n in names), f"{path.name}:{node.lineno}"


def test_glue_uses_no_application_singletons():
    """scene_io and friends take the scene and logics as arguments."""
    forbidden = re.compile(r"slicer\.(mrmlScene|app|modules|util)\b|^\s*import qt|^\s*import ctk", re.M)
    for path in (REPO / "QGSegmentationLib" / "slicer").glob("*.py"):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.strip().startswith("#"))
        code = re.sub(r'""".*?"""', "", code, flags=re.S)
        assert not forbidden.search(code), f"{path.name}: {forbidden.search(code).group(0)}"


def test_handlers_are_wrapped_in_try_with_error_display():
    tree = ast.parse(MODULE_PY.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QGSegmentationWidget")
    for fn in widget.body:
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("on") and fn.name not in (
                "onSceneStartClose", "onSceneEndClose", "onSceneNodesChanged", "onCaseItemChanged",
                "onOutputFolderChanged"):
            decorated = any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "handler"
                            for d in fn.decorator_list)
            inline = "tryWithErrorDisplay" in ast.unparse(fn)
            assert decorated or inline, f"{fn.name} is not wrapped in tryWithErrorDisplay"


def test_logic_never_opens_dialogs():
    tree = ast.parse(MODULE_PY.read_text())
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QGSegmentationLogic")
    source = ast.unparse(logic)
    for dialog in ("Display(", "QMessageBox", "QFileDialog", "confirm", "pip_install"):
        assert dialog not in source, dialog


def test_recorded_event_streams_are_valid():
    from QGSegmentationLib.engine.events import read_events, validate_stream

    folder = MODULE / "Testing" / "Python" / "events"
    names = sorted(p.name for p in folder.glob("*.jsonl"))
    assert names == ["events.jsonl", "predict-events.jsonl", "quality-events.jsonl"]
    for name in names:
        events = read_events(folder / name)
        validate_stream(events)
        assert events[-1]["status"] == "ok"
        assert any(e["event"] == "progress" for e in events), name


def test_everything_compiles():
    """Compiled in memory: the test writes no __pycache__ into the source tree."""
    for path in [*MODULE.rglob("*.py"), *SLICER_SIDE]:
        compile(path.read_text(), str(path), "exec")


def test_module_uses_only_existing_backend_names():
    """Every `from QGSegmentationLib... import X` and every `jobs.X` / `scene_io.X` /
    `environment.X` used by the Qt layer exists in the backend (a typo would only show in Slicer)."""
    import importlib

    for path in [MODULE_PY, *(MODULE / "Testing" / "Python").glob("*.py")]:
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("QGSegmentationLib"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
                    aliases[alias.asname or alias.name] = getattr(module, alias.name, None) or \
                        importlib.import_module(f"{node.module}.{alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = aliases.get(node.value.id)
                if target is not None and hasattr(target, "__file__"):
                    assert hasattr(target, node.attr), f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}"


def test_the_plan_hint_loads_no_deep_learning_stack():
    """The panel plans from the scene at every change of the Cases table: what that imports
    (slicer/jobs, data/planning, data/io) must not pull in torch or MONAI, at run time."""
    code = ("import sys\n"
            "from QGSegmentationLib.slicer import jobs, scene_io\n"
            "from QGSegmentationLib.data.planning import Fingerprint\n"
            "print(jobs.plan_hint(jobs.TrainingOptions(), Fingerprint(((64, 64, 40),), ((0.5, 0.5, 1.0),)), None))\n"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    hint, loaded = out.stdout.strip().splitlines()
    assert hint.startswith("auto on the CPU") and loaded == "[]"


def test_docs_state_what_the_code_does():
    """The cancel grace, the torch minimum and where worker.log is, as the code has them."""
    from QGSegmentationLib.slicer.environment import TORCH_REQUIREMENT
    from QGSegmentationLib.slicer.runner import DEFAULT_GRACE_S

    readme = (REPO / "README.md").read_text()
    panel = (REPO / "docs" / "slicer-panel.md").read_text()
    grace = f"{DEFAULT_GRACE_S:.0f} s"
    assert grace in panel and grace in readme, grace
    assert "killed after 10 s" not in readme and "10 s later" not in panel
    assert f"`{TORCH_REQUIREMENT}`" in panel and ">=2.2`" not in panel
    for text in (readme, panel):
        assert "`worker.log` in the run folder" not in text  # it is in each stage's folder
    assert "worker.log` in each stage's folder" in panel


def _subprocess_calls(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                and node.func.attr in ("run", "Popen", "call", "check_call", "check_output")):
            yield node


def test_children_started_from_the_panel_open_no_console_window():
    """On Windows a console program started from Slicer's GUI opens a visible console window
    unless created with CREATE_NO_WINDOW (runner.no_console_window / worker_popen_options)."""
    calls = 0
    for path in (REPO / "QGSegmentationLib" / "slicer").glob("*.py"):
        for call in _subprocess_calls(path):
            calls += 1
            spread = [k.value for k in call.keywords if k.arg is None]
            assert any(isinstance(v, ast.Call) and getattr(v.func, "id", "") in (
                "no_console_window", "worker_popen_options") for v in spread), f"{path.name}:{call.lineno}"
    assert calls >= 3  # the worker, taskkill, the torch probe


def test_slicer_never_imports_torch_to_decide_what_to_install():
    """PyTorchUtils' torchInstalled() imports torch (and is true for a too-old one): the panel
    decides from metadata (environment.install_plan) instead."""
    tree = ast.parse(MODULE_PY.read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    importing = {"torchInstalled", "importTorch", "getDevice", "torchVersionInformation"}  # PyTorchUtilsLogic's
    assert not used & importing, used & importing
    assert "install_plan" in used


def test_the_panel_follows_scene_close_and_load():
    """Closing the scene detaches a running run (node IDs restart in the next scene); loading one
    fills the Review and Cases sections from it."""
    tree = ast.parse(MODULE_PY.read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QGSegmentationWidget")
    methods = {fn.name: ast.unparse(fn) for fn in widget.body if isinstance(fn, ast.FunctionDef)}
    assert "self.onSceneEndImport" in methods["setup"] and "EndImportEvent" in methods["setup"]
    assert "loadReviewFromScene" in methods["onSceneEndImport"] and "refreshCases" in methods["onSceneEndImport"]
    assert "detachFromScene" in methods["onSceneStartClose"]
    assert "scene_io.case_volumes" in methods["refreshCases"]


def _module_function(name: str):
    """A pure-Python helper of the module file, compiled alone (the file imports qt and slicer)."""
    tree = ast.parse(MODULE_PY.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"os": os}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(MODULE_PY), "exec"), namespace)
    return namespace[name]


def test_the_module_finds_the_backend_from_a_checkout_and_from_a_built_extension(tmp_path):
    """README's install from a checkout adds `<checkout>/QGSegmentation` as a module path, where
    QGSegmentationLib is one folder up; a built extension ships it next to the module file. The
    module puts the right folder on sys.path and on the worker's PYTHONPATH in both layouts."""
    backend_parent = _module_function("backend_parent")
    assert backend_parent(str(MODULE)) == str(REPO)
    built = tmp_path / "qt-scripted-modules"
    (built / "QGSegmentationLib").mkdir(parents=True)
    assert backend_parent(str(built)) == str(built)
    checkout = tmp_path / "checkout"
    (checkout / "QGSegmentation").mkdir(parents=True)
    (checkout / "QGSegmentationLib").mkdir()
    assert backend_parent(str(checkout / "QGSegmentation")) == str(checkout)
    text = MODULE_PY.read_text()
    assert "sys.path.insert(0, LIBRARY_PARENT)" in text
    assert "worker_environment(os.environ, MODULE_DIR)" not in text
