"""The distribution's dependencies: `pip install pretrain-spec` brings torch and numpy only, and every `optimized`
module imports with nothing else (the extras: rich, matplotlib, deepspeed, transformers, triton, flash-attn)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("rich", "matplotlib", "deepspeed", "transformers", "triton", "flash_attn")
KERNEL_MODULES = {f"optimized.attention.triton.{m}": "triton" for m in ("backward", "common", "forward", "launch")}
"""Modules that are a kernel written in an extra: they may need it (and are imported only when it is there);
everything that imports them (optimized.attention's dispatch) imports without it."""

IMPORT_ALL = """
import importlib, pkgutil, sys

class Missing:
    '''Acts as if the extras were not installed: importing one raises ModuleNotFoundError.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Missing())
import optimized
names = [m.name for m in pkgutil.walk_packages(optimized.__path__, "optimized.")]
needs = {{}}
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        needs[name] = error.name.split(".")[0]
leaked = sorted({{m.split(".")[0] for m in sys.modules}} & {blocked!r})
assert not leaked, leaked
print(needs)
print(len(names))
"""


def test_every_optimized_module_imports_without_the_extras():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL.format(blocked=set(EXTRAS))], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    needs, count = proc.stdout.strip().splitlines()[-2:]
    assert ast.literal_eval(needs) == KERNEL_MODULES  # every other module imports without the extras
    assert int(count) >= 10  # the walk found the modules


def test_base_install_needs_only_torch_and_numpy_and_the_extras_say_what_they_bring():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]]
    assert sorted(names) == ["numpy", "torch"]
    extras = project["optional-dependencies"]
    main_job = " ".join(extras["conformance"])
    for package in ("rich", "matplotlib", "deepspeed", "transformers", "triton"):
        assert package in main_job
    assert "pretrain-spec[conformance]" in extras["test"] and "pytest" in " ".join(extras["test"])
    assert extras["flash"] == ["flash-attn"]
