"""The layering you can see in the folders holds, and the engine I/O contract is spelled once.

Layers, lowest first; a module may import its own layer and the ones below, never above:

    core        llmc.{errors, dtypes, config, limits, contract, header, engine_file, devices,
                checkpoint, graph, arrays, version}
    compiler    llmc.model_zoo, llmc.passes, llmc.quantization, llmc.plugins
    backends    llmc.backends
    pipeline    llmc.build, llmc.runtime
    cli         llmc.cli, llmc.__main__, and the `llmc` package itself (its lazy `Runner`)

Every import statement counts, also those inside functions: a lazy import upward is still
an upward dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {
    "core": 0, "llmc.model_zoo": 1, "llmc.passes": 1, "llmc.quantization": 1,
    "llmc.plugins": 1, "llmc.backends": 2, "llmc.build": 3, "llmc.runtime": 3,
    "llmc.cli": 4, "llmc.__main__": 4, "llmc": 4,
}
CORE = {"llmc.errors", "llmc.dtypes", "llmc.config", "llmc.limits", "llmc.contract",
        "llmc.header", "llmc.engine_file", "llmc.devices", "llmc.checkpoint", "llmc.graph",
        "llmc.arrays", "llmc.version"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from pyproject's package-dir."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for package, folder in cfg["package-dir"].items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module == "llmc":
        return LAYERS["llmc"]
    if any(module == c or module.startswith(c + ".") for c in CORE):
        return LAYERS["core"]
    for prefix, level in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} belongs to no layer; add it to this test's table")


def _imports(name: str, path: Path) -> set[str]:
    """The llmc modules `name` imports (a `from X import Y` counts as X.Y when that is a
    module, else X)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "llmc")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                pkg = name if is_pkg else name.rsplit(".", 1)[0]
                pkg = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1])
                base = f"{pkg}.{base}" if base else pkg
            if base.split(".")[0] != "llmc":
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return out - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_table_knows_every_module():
    assert len(MODULES) > 40
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_nothing_imports_upward(name):
    upward = sorted(m for m in GRAPH[name] if _layer(m) > _layer(name))
    assert not upward, f"{name} (layer {_layer(name)}) imports {upward} from above"


def test_no_import_cycles():
    done, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in done or m not in GRAPH:
            return
        stack.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_runtime_loads_no_build_time_code(tiny_models, tmp_path):
    """Running an engine imports neither the graph builder, the model zoo nor the passes."""
    from llmc.build import BuildOptions, build
    from llmc.limits import BuildLimits

    engine = tmp_path / "t.engine"
    build(BuildOptions(tiny_models["llama-gqa"][0], engine, limits=BuildLimits(2, 16, 32, 8)),
          log=lambda _: None)
    code = (f"import sys; from llmc import Runner; Runner({str(engine)!r}).generate('w3', 2); "
            "print(sorted(m for m in sys.modules if m.startswith(('llmc.graph', "
            "'llmc.model_zoo', 'llmc.passes', 'llmc.build', 'llmc.quantization.quantize', "
            "'llmc.quantization.qdq', 'llmc.quantization.measure'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


CONTRACT_NAMES = {"input_ids", "position_ids", "seq_starts", "context_lens", "block_tables",
                  "last_token_rows", "logits"}
# strings of the kv_cache_* shape that name no engine tensor: another format's config keys
NOT_ENGINE_NAMES = {"kv_cache_scheme"}   # compressed-tensors' quantization_config


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "llmc.contract"))
def test_only_the_contract_spells_the_engine_tensor_names(name):
    """String literals naming an engine input/output (or a KV pool, kv_cache_*) appear only
    in llmc/contract.py; everything else imports them from there."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in CONTRACT_NAMES or node.value.startswith("kv_cache_") and \
                    node.value not in NOT_ENGINE_NAMES:
                found.append(node.value)
    assert not found, f"{name} spells {found}: use llmc.contract"
