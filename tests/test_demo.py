"""The demo package's rooms: its parts (``taskvec_interp.demo.parts``) and what they decide before running."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskvec_interp.demo.parts import _rel, _row, family_source


def test_pos_reads_the_treebank_when_one_resolves(monkeypatch):
    from taskvec_interp.tasks import UD_EXCERPT

    monkeypatch.setenv("TASKVEC_UD_PATH", str(UD_EXCERPT))
    assert family_source("pos") == ({}, "")
    assert family_source("bitwise") == ({}, "")


def test_pos_falls_back_to_the_shipped_excerpt_offline_and_says_so(monkeypatch):
    import taskvec_interp.tasks as tasks

    monkeypatch.delenv("TASKVEC_UD_PATH", raising=False)
    real = tasks.get_family

    def offline(name, **kw):
        if name == "pos" and not kw:
            raise ValueError("could not download en_ewt-ud-dev.conllu\nmore")
        return real(name, **kw)

    monkeypatch.setattr(tasks, "get_family", offline)
    kwargs, note = family_source("pos")
    assert kwargs == {"path": "excerpt"}
    assert "could not download" in note and "TASKVEC_UD_PATH" in note and "more" not in note
    fam = real("pos", **kwargs)  # the excerpt builds the family offline: every tag task and Null
    assert len(fam.task_names) == 7 and "NOUN" in fam.task_names[0].upper()


def test_part_paths_are_relative_to_the_demo_directory(tmp_path: Path):
    assert _rel([tmp_path / "td_fv" / "a.png"], tmp_path) == ["td_fv/a.png"]
    with pytest.raises(ValueError):
        _rel([Path("/elsewhere/a.png")], tmp_path)
    assert _row("m", 1, "p") == {"metric": "m", "ours": 1, "paper": "p"}
