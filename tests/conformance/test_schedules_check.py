"""The schedules check runs without transformers (a runtime install has no test extra): the peer rows say so."""

import builtins
from pathlib import Path

import torch

from conformance.checks import Context
from conformance.checks.schedules import run


def test_without_transformers_the_peer_is_skipped_not_crashed(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.startswith("transformers"):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    rows = run(Context(torch.device("cpu"), 1, True, Path(tmp_path)))
    assert rows and all(r.equivalence.passed for r in rows)
    skipped = [r for r in rows if r.peer is None]
    assert skipped and all("transformers is not installed" in r.notes for r in skipped)
    assert any(r.peer and "CosineAnnealingLR" in r.peer for r in rows)
