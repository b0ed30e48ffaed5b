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


def test_the_demo_reads_every_fv_task_in_td_and_the_core_tasks_in_patching_and_zero_shot():
    from taskvec_interp.demo.parts import family_source
    from taskvec_interp.tasks import get_family
    from taskvec_interp.tasks.function_vectors import FV_CORE_TASKS, FV_TASKS

    assert family_source("fv") == ({}, "") and get_family("fv").task_names[:-1] == FV_TASKS
    for part in ("patch", "zeroshot"):
        kwargs, note = family_source("fv", part)
        assert kwargs == {"tasks": list(FV_CORE_TASKS)} and f"{len(FV_CORE_TASKS)} core tasks" in note
    assert family_source("bitwise", "patch") == ({}, "")


def test_the_demo_runs_the_shuffled_control_at_four_shots_or_the_largest_unless_told():
    from taskvec_interp.demo.config import DemoConfig, DemoTDConfig

    assert DemoConfig().td.shuffled_shots == (4,) and DemoConfig(quick=True).td.shuffled_shots == (4,)  # paper's 4
    assert DemoConfig(td=DemoTDConfig(shots=(2, 5))).td.shuffled_shots == (5,)  # 4 not swept: the largest
    assert DemoConfig(td=DemoTDConfig(shots=(2, 5), shuffled_shots=(2, 5))).td.shuffled_shots == (2, 5)
    with pytest.raises(ValueError, match=r"DemoConfig\.td\.shuffled_shots must list shot counts of td\.shots "
                                         r"\[2, 5\], got \[4\]"):
        DemoConfig(td=DemoTDConfig(shots=(2, 5), shuffled_shots=(4,)))
