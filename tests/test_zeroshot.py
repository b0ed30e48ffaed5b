"""Hendel et al.'s zero-shot task-vector preset (experiments/zeroshot.py): the per-query vector is the plain forward's
last-token state averaged over the query's dummies, the patched runs are the plain patched greedy runs (the state
replaced at the zero-shot prompt's last token, prefill only), dev and test are disjoint, bad inputs are refused before
any model work, the statistics follow their definitions, results round-trip, the CLI is the config."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from conftest import tiny_lm
from typer.testing import CliRunner

from taskvec_interp.adapters import TorchHooksAdapter
from taskvec_interp.experiments.zeroshot import (
    COLUMNS,
    ZeroShotConfig,
    ZeroShotResult,
    run_zero_shot,
    zero_shot_prompts,
)
from taskvec_interp.experiments.zeroshot_cli import zeroshot
from taskvec_interp.figures.zeroshot import plot_zero_shot_curve, zero_shot_figures
from taskvec_interp.probes.stats import mcnemar_exact
from taskvec_interp.probes.vectors import TaskVectors, dummy_query_prompts, per_query_vectors
from taskvec_interp.tasks import (
    Example,
    ExampleTask,
    RandomOutputTask,
    TaskFamily,
    register_family,
    unregister_family,
)
from taskvec_interp.tasks.tokenization import first_content_text

TEMPLATE = {"input_prefix": "", "output_prefix": " w3", "example_separator": " w4 "}


def toy_family(n_inputs: int = 40) -> TaskFamily:
    """A maps w_i to w_{i+100}, B to w_{i+150} (inputs w10..), Null random: word tokens the tiny tokenizer knows."""
    inputs = range(10, 10 + n_inputs)
    a = ExampleTask("A", [Example(f"w{i}", f"w{i + 100}") for i in inputs])
    b = ExampleTask("B", [Example(f"w{i}", f"w{i + 150}") for i in inputs])
    null = RandomOutputTask([f"w{i}" for i in inputs], outputs=["w200", "w201"])
    return TaskFamily("toy", [a, b], null)


def cfg(**kw) -> ZeroShotConfig:
    return ZeroShotConfig(**({"family": "toy", "template": TEMPLATE, "shots": 3, "n_dev": 3, "n_test": 5,
                              "n_dummy": 2, "n_boot": 50, "layers": "all"} | kw))


@pytest.fixture
def adapter(word_tokenizer):
    model = tiny_lm("llama", seed=3, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return TorchHooksAdapter(model, word_tokenizer)


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text, add_special_tokens=True)["input_ids"]])


@torch.no_grad()
def _block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output for one unpadded prompt, by plain forward hooks: ``[seq, d]`` per layer."""
    got = []
    handles = [blk.register_forward_hook(lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o)[0].clone()))
               for blk in model.model.layers]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def _plain_greedy(model, ids: torch.Tensor, n_new: int, layer: int | None = None, vec: torch.Tensor | None = None,
                  eos: int = 0) -> list[int]:
    """Greedy decoding of one prompt by full re-forwards, the output of ``layers[layer]`` at the PROMPT's last
    position replaced by ``vec`` in every forward (that is what the KV cache of a patched prefill holds)."""
    p = ids.shape[1]
    out: list[int] = []
    seq = ids
    for _ in range(n_new):
        handle = None
        if layer is not None:
            def patch(m, a, o):
                h = (o[0] if isinstance(o, tuple) else o).clone()
                h[0, p - 1] = vec
                return (h, *o[1:]) if isinstance(o, tuple) else h

            handle = model.model.layers[layer].register_forward_hook(patch)
        try:
            nxt = int(model(input_ids=seq).logits[0, -1].argmax())
        finally:
            if handle is not None:
                handle.remove()
        if nxt == eos:
            break
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    return out


# ------------------------------------------------------------------------------------------------
# The method against plain computations
# ------------------------------------------------------------------------------------------------
def test_per_query_vector_is_the_plain_last_token_state_averaged_over_the_dummies(adapter):
    tok, model = adapter.tokenizer, adapter.model
    fam = toy_family()
    zp = zero_shot_prompts(fam, cfg())
    vecs = per_query_vectors(adapter, zp.icl, fam, n_dummy=2, template=None, dummies=zp.dummies, progress=False)
    assert vecs.shape == (adapter.n_layers, len(zp.icl), adapter.d_model)
    q = 4  # one query by hand: its own demonstrations + each dummy query, the last token's state at every layer
    mine = zp.dummies[2 * q: 2 * q + 2]
    assert all(d.demos == zp.icl[q].demos and d.query not in {zp.icl[q].query, *(e.input for e in d.demos)}
               for d in mine)
    assert mine[0].query != mine[1].query and mine[0].text.startswith(zp.icl[q].text.rsplit(" w4 ", 1)[0])
    by_hand = torch.stack([torch.stack(_block_outputs(model, _ids(tok, d.text)))[:, -1] for d in mine]).mean(0)
    torch.testing.assert_close(vecs[:, q], by_hand, rtol=1e-4, atol=1e-5)
    # drawn from the family with the same seed: the same dummies (a task's draws keyed by the task)
    again = dummy_query_prompts(zp.icl, fam, None, 2, 0)
    assert [p.text for p in again] == [p.text for p in dummy_query_prompts(zp.icl, fam, None, 2, 0)]


def test_the_vector_replaces_the_zero_shot_prompts_last_state(adapter):
    """Every generated answer of the run equals a plain greedy decoding with the block output at the zero-shot
    prompt's last token replaced by the query's own vector (per_query) or its task's dev mean (per_task)."""
    tok, model = adapter.tokenizer, adapter.model
    fam = toy_family()
    config = cfg(layers="0,2")
    seen = []  # the hooks the run gives the branch engine
    engine = adapter.generate_branches
    adapter.generate_branches = lambda texts, branches, *a, **k: seen.append((texts, branches)) or engine(
        texts, branches, *a, **k)
    res = run_zero_shot(adapter, config, fam, progress=False)
    zp = zero_shot_prompts(fam, config)
    vecs = per_query_vectors(adapter, zp.icl, n_dummy=2, dummies=zp.dummies, layers=[0, 2], progress=False)
    preds = res.predictions
    assert list(preds.columns) == COLUMNS
    n_new = 1  # every toy answer is one word token
    for q in (0, 9, 15):
        ids = _ids(tok, zp.zero[q].text)
        rows = preds[preds["query"] == q]
        for r in rows.itertuples():
            if r.condition == "task_vector":
                li = [0, 2].index(r.layer)
                dev = zp.rows(zp.icl[q].task, "dev")
                vec = vecs[li, q] if r.vector == "per_query" else vecs[li, dev].mean(0)
                want = _plain_greedy(model, ids, n_new, r.layer, vec)
            elif r.condition == "baseline":
                want = _plain_greedy(model, ids, n_new)
            else:
                want = _plain_greedy(model, _ids(tok, zp.icl[q].text), n_new)
            assert r.generated == tok.decode(want, skip_special_tokens=True), (q, r.condition, r.vector, r.layer)
    # those hooks write the zero-shot prompt's LAST token only, with the vector
    texts, branches = seen[0]
    assert texts == [z.text for z in zp.zero] and len(branches) == 1 + 2 * 2 and branches[0] == []
    (site, fn), = branches[1 + 1]  # per_query at layer 2
    assert (site.layer, site.component) == (2, "resid_post")
    last = adapter.capture(texts, layers=[2], position=-1, hooks=[(site, fn)], progress=False)
    torch.testing.assert_close(last.tensor[0], vecs[1])
    before = adapter.capture(texts, layers=[2], position=-2, hooks=[(site, fn)], progress=False)
    plain = adapter.capture(texts, layers=[2], position=-2, progress=False)
    torch.testing.assert_close(before.tensor, plain.tensor)
    # per-task vectors are the dev queries' mean, saved as the library's 'hendel' definition
    tv = res.vectors["per_task"]
    assert tv.definition == "hendel" and tv.layers == [0, 2]
    torch.testing.assert_close(tv.get(2, "B"), vecs[1, zp.rows("B", "dev")].mean(0))


def test_dev_and_test_are_disjoint_and_replacement_keeps_them_so():
    fam = toy_family(40)
    zp = zero_shot_prompts(fam, cfg(n_dev=10, n_test=20))
    for task in ("A", "B"):
        dev = {zp.icl[i].query for i in zp.rows(task, "dev")}
        test = {zp.icl[i].query for i in zp.rows(task, "test")}
        assert len(dev) == 10 and len(test) == 20 and not dev & test
    assert [p.task for p in zp.icl] == ["A"] * 30 + ["B"] * 30 and "null" not in zp.tasks
    assert all(z.text == f"{p.query} w3" and z.n_shots == 0 and p.n_shots == 3 for z, p in zip(zp.zero, zp.icl, strict=True))
    assert all(p.query not in {e.input for e in p.demos} for p in zp.icl)
    small = toy_family(12)  # 12 inputs < 10 + 20 queries: refused without replacement, naming the numbers
    with pytest.raises(ValueError, match=r"task 'A' has 12 distinct inputs, fewer than n_dev \+ n_test = 10 \+ 20 = 30"
                                         r".*overlap.*replace"):
        zero_shot_prompts(small, cfg(n_dev=10, n_test=20))
    zr = zero_shot_prompts(small, cfg(n_dev=10, n_test=20, replace=True))
    for task in ("A", "B"):
        dev = [zr.icl[i].query for i in zr.rows(task, "dev")]
        test = [zr.icl[i].query for i in zr.rows(task, "test")]
        assert len(dev) == 10 and len(test) == 20 and not set(dev) & set(test)
        assert len(set(dev)) + len(set(test)) <= 12 and len(set(test)) < len(test)  # with replacement
    # the seed decides the queries; a task's queries do not depend on the other tasks
    assert [p.text for p in zero_shot_prompts(fam, cfg(seed=1)).icl] != [p.text for p in zp.icl]
    only_a = TaskFamily("toy", [fam["A"]], fam.null)
    assert [p.text for p in zero_shot_prompts(only_a, cfg(n_dev=10, n_test=20)).icl] == [p.text for p in zp.icl[:30]]


def test_bad_inputs_are_refused_before_any_model_work(adapter, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("model work before the checks")

    for name in ("_forward", "_generate", "_generate_branches"):
        monkeypatch.setattr(adapter, name, no_model)
    fam = toy_family(8)
    with pytest.raises(ValueError, match=r"task 'A' has 8 inputs: a query, its 6 demonstrations \(shots\) and 2 dummy"):
        run_zero_shot(adapter, cfg(shots=6), fam, progress=False)
    with pytest.raises(ValueError, match=r"fewer than n_dev \+ n_test = 3 \+ 6 = 9: the dev and test splits would "
                                         "overlap"):
        run_zero_shot(adapter, cfg(n_test=6), fam, progress=False)
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        run_zero_shot(adapter, cfg(family="nope"), progress=False)
    with pytest.raises(ValueError, match=r"ZeroShotConfig.layer 5 is not among the layers swept"):
        run_zero_shot(adapter, cfg(layer=5), toy_family(), progress=False)
    with pytest.raises(ValueError, match="family 'bitwise' does not take .*strip"):
        cfg(family="bitwise", strip=False).build_family()
    for kw, match in [({"n_test": 2}, r"ZeroShotConfig.n_test must be an int >= 5, got 2"),
                      ({"n_per_task": 7}, r"n_per_task must be n_dev \+ n_test = 8"),
                      ({"shots": 0}, "ZeroShotConfig.shots"), ({"vectors": ("mean",)}, "ZeroShotConfig.vectors"),
                      ({"scoring": "prefix"}, "ZeroShotConfig.scoring"), ({"select": "best"}, "ZeroShotConfig.select"),
                      ({"n_dummy": 0}, "ZeroShotConfig.n_dummy")]:
        with pytest.raises(ValueError, match=match):
            cfg(**kw)
    assert cfg().n_per_task == 8 and ZeroShotConfig().family == "fv"


# ------------------------------------------------------------------------------------------------
# Scoring and statistics
# ------------------------------------------------------------------------------------------------
def test_scoring_cuts_at_the_line_end_or_separator_and_compares_first_content_tokens(smol_tokenizer):
    # the library's one scoring (probes.accuracy), which the zero-shot preset calls
    from taskvec_interp.probes.accuracy import exact_match, first_token_match

    assert exact_match(" changed\nA", "changed") and exact_match(" a b\n\nc", "a b", "\n\n")
    assert exact_match(" Paris, France w4 x", "Paris, France", " w4 ") and exact_match("x y", "x y", " ")
    tok = smol_tokenizer

    def ft(generated: str, answer: str) -> bool:
        return first_token_match(tok, tok(generated)["input_ids"], first_content_text(tok, tok(answer)["input_ids"]))

    assert ft(" Paris\nA", " Paris") and ft("  Paris", " Paris") and ft(" Judgement", " Judge")
    assert not ft(" larvae", " larva") and not ft(" closed", " close")  # whole tokens, never string prefixes
    assert not ft("\nParis", " Paris") and not ft(" ", " Paris")


def test_mcnemar_table_and_curve_follow_their_definitions():
    t = mcnemar_exact([1] * 8 + [0] * 2, [0] * 10)
    assert (t.b, t.c) == (8, 0) and t.p_value == pytest.approx(2 * 0.5 ** 8)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0
    # a constructed run: 10 test queries of one task; baseline right on 1, per_query at layer 1 right on 9, per_task
    # at layer 1 on 5 (of them 1 right only there), ICL on 10; dev decides layer 1
    rows = []
    outcomes = {("baseline", "", -1): [1] + [0] * 9, ("task_vector", "per_query", 1): [0] + [1] * 9,
                ("task_vector", "per_query", 0): [0] * 10, ("task_vector", "per_task", 1): [1] * 5 + [0] * 5,
                ("task_vector", "per_task", 0): [0] * 10, ("icl", "", -1): [1] * 10}
    for (cond, vec, layer), ok in outcomes.items():
        for q, o in enumerate(ok):
            rows.append({"task": "A", "split": "test", "layer": layer, "condition": cond, "vector": vec, "query": q,
                         "input": f"x{q}", "answer": "y", "generated": "y" if o else "n", "exact": bool(o),
                         "first_token": bool(o)})
    preds = pd.DataFrame(rows)[COLUMNS]
    res = ZeroShotResult(cfg(n_boot=200), preds, {"per_query": 1, "per_task": 1},
                         {"per_query": {"A": 1}, "per_task": {"A": 1}})
    tab = res.table().set_index("task")
    a = tab.loc["A"]
    assert (a["baseline"], a["per_query"], a["per_task"], a["icl"]) == (0.1, 0.9, 0.5, 1.0)
    assert (a["per_query_only_vs_baseline"], a["baseline_only_vs_per_query"]) == (9, 1)
    assert (a["per_query_only_vs_per_task"], a["per_task_only_vs_per_query"]) == (5, 1)
    assert a["p_per_query"] == pytest.approx(mcnemar_exact(outcomes[("task_vector", "per_query", 1)],
                                                           outcomes[("baseline", "", -1)]).p_value)
    assert a["per_query_gain"] == pytest.approx(0.8) and a["per_query_gain_low"] <= 0.8 <= a["per_query_gain_high"]
    assert a["p_per_query_vs_per_task"] == pytest.approx(mcnemar_exact([0] + [1] * 9, [1] * 5 + [0] * 5).p_value)
    assert a["baseline_low"] <= 0.1 <= a["baseline_high"] and tab.loc["all", "per_query"] == 0.9
    curve = res.curve()
    got = curve[(curve.condition == "task_vector") & (curve.vector == "per_query") & (curve.task == "all")]
    assert dict(zip(got.layer, got.accuracy, strict=True)) == {1: 0.9, 0: 0.0}
    assert res.outcomes("task_vector", vector="per_query", layer=0).sum() == 0


# ------------------------------------------------------------------------------------------------
# Results, figures, the command line
# ------------------------------------------------------------------------------------------------
def test_result_round_trip_and_figures(adapter, tmp_path):
    fam = toy_family()
    res = run_zero_shot(adapter, cfg(layers="1,2", select="per_task"), fam, progress=False)
    assert set(res.chosen_layer) == {"per_query", "per_task"} and set(res.task_layers["per_query"]) == {"A", "B"}
    assert res.predictions.groupby(["condition", "vector", "layer"]).size().nunique() == 1  # same queries everywhere
    back = ZeroShotResult.load(res.save(tmp_path / "zs"))
    pd.testing.assert_frame_equal(back.predictions, res.predictions)
    assert back.config == res.config and back.chosen_layer == res.chosen_layer and back.task_layers == res.task_layers
    pd.testing.assert_frame_equal(back.table(), res.table())
    assert isinstance(TaskVectors.load(tmp_path / "zs" / "per_task_vectors.safetensors", adapter), TaskVectors)
    cfg_json = json.loads((tmp_path / "zs" / "config.json").read_text())
    assert cfg_json["provenance"]["model"]["fingerprint"] == adapter.identity()["fingerprint"]
    paths = zero_shot_figures(res, tmp_path / "zs")
    assert all(p.stat().st_size > 5000 for p in paths)
    with pytest.raises(ValueError, match="no 'test' rows for task 'C'"):
        plot_zero_shot_curve(res.curve(), task="C")


def _leaf_fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    assert not any(dataclasses.is_dataclass(hints[f.name]) for f in dataclasses.fields(cls))
    return list(dataclasses.fields(cls))


def test_cli_is_the_config_and_runs(word_tokenizer, tmp_path):
    app = typer.Typer()
    app.command("zeroshot")(zeroshot)
    app.command("other")(lambda: None)
    runner = CliRunner(env={"COLUMNS": "2000", "NO_COLOR": "1"})
    res = runner.invoke(app, ["zeroshot", "--help"], terminal_width=2000)
    assert res.exit_code == 0, res.output
    text = re.sub(r"\s+", " ", res.output)
    cmd = typer.main.get_command(app).commands["zeroshot"]
    flags = {next(o for o in p.opts if o.startswith("--")) for p in cmd.params if p.param_type_name == "option"}
    fields = {"--" + f.name.replace("_", "-") for f in _leaf_fields(ZeroShotConfig)}
    assert flags == fields | {"--out", "--figures", "--overwrite"}
    for f in _leaf_fields(ZeroShotConfig):
        assert f.metadata["help"] and f.metadata["help"] in text, f.name
    for flag in ("--template", "--strip", "--replace", "--scoring", "--select", "--layer", "--n-dummy"):
        assert flag in text
    # the real registration
    from taskvec_interp.cli import app as real_app

    assert "zeroshot" in typer.main.get_command(real_app).commands
    # a run through the command line on a saved tiny model and a folder family
    model_dir = tmp_path / "model"
    tiny_lm("llama", seed=3, bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, shift in (("A", 100), ("B", 150)):
        (folder / f"{name}.json").write_text(json.dumps([{"input": f" w{i} ", "output": f"w{i + shift}"}
                                                         for i in range(10, 22)]))
    out = tmp_path / "zs"
    res = runner.invoke(app, ["zeroshot", "--model", str(model_dir), "--family", f"files:{folder}", "--template",
                              json.dumps(TEMPLATE), "--shots", "2", "--n-dev", "4", "--n-test", "12", "--replace",
                              "--strip", "--layers", "0,2", "--select", "per_task", "--scoring", "exact",
                              "--n-boot", "20", "--out", str(out)], terminal_width=2000)
    assert res.exit_code == 0, res.output + repr(res.exception)
    back = ZeroShotResult.load(out)
    assert back.config.replace and back.config.scoring == "exact" and back.config.strip is True
    assert (out / "figures" / "zero_shot_by_layer.png").exists() and "test split, exact accuracy" in res.output
    assert set(back.predictions["input"]) <= {f"w{i}" for i in range(10, 22)}  # stripped
    bad = runner.invoke(app, ["zeroshot", "--model", str(model_dir), "--family", f"files:{folder}", "--n-dev", "4",
                              "--n-test", "12", "--out", str(tmp_path / "bad")])
    assert isinstance(bad.exception, ValueError) and "would overlap" in str(bad.exception)
    assert not (tmp_path / "bad").exists()


def test_registered_family_and_numpy_outcomes_stay_paired(adapter):
    register_family("toyzs", lambda: toy_family(), replace=True)
    try:
        res = run_zero_shot(adapter, cfg(family="toyzs", layers="2", vectors=("per_query",)), progress=False)
    finally:
        unregister_family("toyzs")
    assert set(res.predictions["vector"]) == {"", "per_query"} and "p_per_query_vs_per_task" not in res.table()
    x = res.outcomes("task_vector", vector="per_query")
    y = res.outcomes("baseline")
    assert x.index.equals(y.index) and np.array_equal(x.index, sorted(x.index))
