"""Every flag of every command has a bound: a bad value exits 2 with one line on stderr naming the flag, before any
work. The flags are read from the parsers themselves, so a new flag without an entry in BAD fails
test_every_flag_has_bad_values (give it a bounded type in conformance/flags.py and its bad values here)."""

from __future__ import annotations

import argparse
import json
import os

import pytest

import conformance.__main__ as suite
from conformance import checks, compare, matrix, mutate
from tools import gpu
from tools.bench import cli as bench
from tools.plan import cli as plan

PARSERS = {"": suite._parser, "plan": plan.parser, "compare": compare._parser, "bench": bench._parser,
           "gpu": gpu._parser, "matrix": matrix._parser, "mutate": mutate._parser}
"""`python -m conformance VERB`: the parser of each verb ('' is the suite itself)."""

SECONDS = ["0", "-1", "nan", "inf", "1e300", "604801", "x"]
"""Bad timeouts and budgets: not positive, not finite, past a week, not a number."""
POSITIVE = ["0", "-3", "nan", "inf", "1e13", "x"]
"""Bad values of a plain positive number (at most 1e12)."""
RANKS = ["0", "-1", "1e3", "1048577", "x"]

# (verb, flag or positional metavar) -> bad values; "{file}", "{dir}", "{fifo}", "{junk}", "{notreport}" are filled in
BAD: dict[tuple[str, str], list[str]] = {
    ("", "--only"): ["nope", ",", "zer"],
    ("", "--skip"): ["nope"],
    ("", "--device"): ["tpu"],
    ("", "--world-size"): [*RANKS, "65"],  # 65: past the 64 gloo ranks on CPU (on CUDA: past the visible GPUs)
    ("", "--out"): ["{file}/x", ""],
    ("", "--junitxml"): ["{file}/x.xml", "{dir}", ""],
    ("", "--timeout"): SECONDS,
    ("", "--threads"): ["0", "1025", "1.5", "x"],
    ("", "--matmul-precision"): ["low"],
    ("", "--tf32"): ["maybe"],
    ("plan", "--model"): ["gpt5"],
    ("plan", "--params"): ["0", "1e16", "nan", "inf", "7Q"],
    **{("plan", f): ["0", "-1", "2147483648", "1e3", "x"] for f in
       ("--layers", "--hidden", "--heads", "--kv-heads", "--vocab", "--mlp-ratio", "--top")},
    **{("plan", f): ["0", "1099511627777", "1e3", "x"] for f in ("--seq-len", "--micro-batch", "--global-batch")},
    ("plan", "--precision"): ["fp8"],
    ("plan", "--gpus"): ["0", "1e12", "1000000000000", "1048577", "x"],
    ("plan", "--gpus-per-node"): ["0", "1048577", "x"],
    **{("plan", flag): POSITIVE for flag, _, _ in plan.HARDWARE},
    ("plan", "--headroom"): ["1", "-0.1", "nan", "x"],
    ("plan", "--tp"): ["0", "1048577", "a", ","],
    ("plan", "--pp"): ["0", "1048577", "a"],
    ("plan", "--cp"): ["0", "1048577", "a"],
    ("plan", "--zero"): ["4", "-1", "a", ","],
    ("plan", "--offload"): ["always"],
    ("plan", "--attention"): ["sparse"],
    ("plan", "--checkpointing"): ["sometimes"],
    ("plan", "--prefer-simple-within"): ["10", "-1", "nan", "x"],
    ("plan", "--json"): ["{file}/p.json", "{dir}", ""],
    ("compare", "OLD"): ["{missing}", "{dir}", "{fifo}", "{junk}", "{notreport}", "/dev/zero"],
    ("compare", "NEW"): ["{missing}", "{dir}", "{fifo}", "{junk}", "{notreport}"],
    ("compare", "--factor"): POSITIVE,
    ("compare", "--tolerance"): POSITIVE,
    ("bench", "target"): ["mlp"],
    ("bench", "--dtype"): ["os", "fp8", "float64", ","],
    ("bench", "--head-dim"): ["0", "1025", "x", ","],
    ("bench", "--seqlen"): ["0", "1025k", "1e3", "x"],
    ("bench", "--causal"): ["maybe"],
    ("bench", "--impl"): ["cudnn", ","],
    ("bench", "--tokens"): ["0", "1073741825", "x"],
    ("bench", "--hidden"): ["0", "1073741825", "x"],
    ("bench", "--budget"): SECONDS,
    ("bench", "--out"): ["{file}/x", ""],
    ("gpu", "--out"): ["{file}/x", ""],
    ("gpu", "--steps"): ["lint", ",", ""],
    **{("gpu", f"--budget-{s}"): SECONDS for s in gpu.STEPS},
    ("matrix", "--cells"): ["nope", ","],
    ("matrix", "--only"): ["nope", ","],
    ("matrix", "--skip"): ["nope"],
    ("matrix", "--out"): ["{file}/x"],
    ("matrix", "--cell-timeout"): SECONDS,
    ("mutate", "--only"): ["nope", ","],
    ("mutate", "--jobs"): ["0", "65", "x"],
    ("mutate", "--timeout"): SECONDS,
    ("mutate", "--device"): ["tpu"],
    ("mutate", "--world-size"): RANKS,
    ("mutate", "--out"): ["{file}/x"],
}

BASE = {"plan": ["--model", "tiny"], "compare": ["{report}", "{report}"], "bench": ["attention"]}
"""Valid arguments a verb needs besides the flag under test."""


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The flags that take a value (the longest spelling) and the positionals (their metavar or dest)."""
    found = []
    for action in parser._actions:
        if action.nargs == 0:  # --help, --quick, -v, --list: no value to bound
            continue
        if action.option_strings:
            found.append(max(action.option_strings, key=len))
        else:
            found.append(action.metavar or action.dest)
    return found


def test_every_flag_has_bad_values():
    missing = [(verb, name) for verb, make in PARSERS.items() for name in _arguments(make())
               if (verb, name) not in BAD]
    assert not missing, f"flags without bad values in BAD (and maybe without a bound): {missing}"
    stale = [key for key in BAD if key[1] not in _arguments(PARSERS[key[0]]())]
    assert not stale, f"BAD names flags no parser has: {stale}"


@pytest.fixture
def files(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"results": []}))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "junk.json").write_text("{")
    (tmp_path / "notreport.json").write_text(json.dumps({"results": [{"check": 1}]}))
    os.mkfifo(tmp_path / "fifo")
    return {"report": str(report), "file": str(tmp_path / "a-file"), "dir": str(tmp_path), "fifo":
            str(tmp_path / "fifo"), "junk": str(tmp_path / "junk.json"), "notreport": str(tmp_path / "notreport.json"),
            "missing": str(tmp_path / "missing.json")}


@pytest.fixture
def no_work(monkeypatch):
    """Any work a command would start fails the test: the bad value must be refused first."""

    def work(*args, **kwargs):
        pytest.fail("work started despite a bad argument")

    monkeypatch.setattr(checks, "run", work)
    monkeypatch.setattr(plan, "plan", work)
    monkeypatch.setattr(bench, "run", work)
    monkeypatch.setattr(gpu, "commands", work)
    monkeypatch.setattr(matrix, "run_cell", work)
    monkeypatch.setattr(mutate, "run_suite", work)
    monkeypatch.setattr(compare, "compare", work)


CASES = [(verb, name, value) for (verb, name), values in BAD.items() for value in values]


@pytest.mark.parametrize(("verb", "name", "value"), CASES, ids=[f"{v or 'suite'} {n} {x!r}" for v, n, x in CASES])
def test_a_bad_value_exits_2_with_one_line_naming_the_argument(verb, name, value, files, no_work, capsys,
                                                               monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a default output folder, if one were made, lands here
    value = value.format(**files)
    base = [a.format(**files) for a in BASE.get(verb, [])]
    if name.startswith("-"):
        argv = [*base, f"{name}={value}"]  # '=' keeps '-1' and '' the flag's value
    else:  # a positional: put the bad value in its place
        positionals = [a for a in _arguments(PARSERS[verb]()) if not a.startswith("-")]
        argv = list(base)
        argv[positionals.index(name)] = value
    try:
        status = suite.main(([verb] if verb else []) + argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, (argv, err)
    assert err.count("\n") == 1, (argv, err)
    assert f"argument {name}" in err, (argv, err)
