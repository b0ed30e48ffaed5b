"""The demo package's rooms: its parts (``taskvec_interp.demo.parts``) and what they decide before running."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskvec_interp.demo.parts import _pos_available, _rel, _row


def test_pos_unavailable_names_the_reason(monkeypatch):
    import taskvec_interp.tasks as tasks

    def no_treebank(name, **kw):
        raise ValueError("no CoNLL-U file found\nmore")

    monkeypatch.setattr(tasks, "get_family", no_treebank)
    why = _pos_available()
    assert why is not None and "no CoNLL-U file found" in why and "TASKVEC_UD_PATH" in why and "more" not in why


def test_part_paths_are_relative_to_the_demo_directory(tmp_path: Path):
    assert _rel([tmp_path / "td_fv" / "a.png"], tmp_path) == ["td_fv/a.png"]
    with pytest.raises(ValueError):
        _rel([Path("/elsewhere/a.png")], tmp_path)
    assert _row("m", 1, "p") == {"metric": "m", "ours": 1, "paper": "p"}
