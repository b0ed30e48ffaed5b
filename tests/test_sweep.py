"""ICL accuracy, the TD x shots sweep, the TD-vs-accuracy fit and their saved outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from taskvec_interp.experiments.sweep import SweepConfig, fit_td_accuracy, load_sweep, run_sweep, summarize
from taskvec_interp.probes.accuracy import icl_accuracy, normalize_answer
from taskvec_interp.tasks import build_prompts, check_tokenization, get_family


def test_normalize_answer():
    assert normalize_answer(" down\nright ->") == "down"
    assert normalize_answer("  New   York\n") == "New York"
    assert normalize_answer(" a; b", stop="; ") == "a"
    assert normalize_answer(" a b", stop=" ") == "a b"  # a space separator never cuts


def _greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def test_icl_accuracy_scores_greedy_generations_and_captures_the_prefill(tiny_smol):
    prompts = build_prompts(get_family("bitwise"), n_per_task=2, shots=2, seed=0)
    res = icl_accuracy(tiny_smol, prompts, capture_layers="all", batch_size=5, progress=False)
    tok = tiny_smol.tokenizer
    assert res.max_new_tokens == 6  # " " + five digits with SmolLM2's tokenizer
    checks = check_tokenization(tok, prompts)
    for i, p in enumerate(prompts):
        ids = tiny_smol.encode([p.text])[0]
        new = _greedy(tiny_smol.model, ids, res.max_new_tokens)
        text = tok.decode(new, skip_special_tokens=True)
        assert res.predictions.loc[i, "generated"] == text
        assert res.predictions.loc[i, "exact"] == (" ".join(text.split("\n")[0].split()) == p.answer.strip())
        assert res.predictions.loc[i, "first_token"] == (new[0] == checks[i].answer_ids[0])
    torch.testing.assert_close(res.activations, tiny_smol.capture([p.text for p in prompts], progress=False),
                               atol=1e-5, rtol=0)
    table = res.by_task()
    assert list(table.columns) == ["task", "label", "shots", "n", "exact", "first_token"]
    assert table["n"].tolist() == [2] * 7


def test_exact_match_counts_a_correct_answer(tiny_smol):
    """Force the right answer through a hook on the logits' source: replace the last layer so the
    LM head emits the answer's first token; the exact/first-token columns must flip to True."""
    prompts = build_prompts(get_family("bitwise"), n_per_task=1, shots=1, seed=3)[:1]
    tok = tiny_smol.tokenizer
    answer_ids = check_tokenization(tok, prompts)[0].answer_ids
    emb = tiny_smol.model.get_input_embeddings().weight  # tied: a residual equal to 100*e_t predicts t
    step = {"i": 0}

    def force(act, ctx):
        out = act.clone()
        target = answer_ids[min(step["i"], len(answer_ids) - 1)]
        out[:, -1] = 100 * emb[target]
        step["i"] += 1
        return out

    res = icl_accuracy(tiny_smol, prompts, hooks=[("blocks.3.hook_resid_post", force)], progress=False)
    assert res.predictions.loc[0, "first_token"]
    assert res.predictions.loc[0, "exact"], res.predictions.loc[0, "generated"]


def test_budget_and_bad_inputs(tiny_smol):
    prompts = build_prompts(get_family("bitwise"), n_per_task=1, shots=1, seed=0)
    with pytest.raises(ValueError, match="longer than the budget"):
        icl_accuracy(tiny_smol, prompts, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        icl_accuracy(tiny_smol, [], progress=False)
    with pytest.raises(TypeError, match="Prompt objects"):
        icl_accuracy(tiny_smol, ["01 10 ->"], progress=False)
    with pytest.raises(ValueError, match="shots"):
        SweepConfig(shots=())


def test_sweep_tables_fit_and_saved_outputs(tiny_smol, tmp_path):
    cfg = SweepConfig(family="bitwise", shots=(1, 2), n_per_task=12, n_boot=50, k=5, batch_size=32)
    res = run_sweep(tiny_smol, cfg, progress=False)
    n_layers, n_tasks = tiny_smol.n_layers, 7
    overall = res.td[res.td["level"] == "overall"]
    assert len(overall) == n_layers * 2 and set(overall["shots"]) == {1, 2}
    assert len(res.td[res.td["level"] == "task"]) == n_layers * 2 * n_tasks
    assert len(res.accuracy) == n_tasks * 2
    assert res.activations[2][0].shape == (n_layers, 12 * n_tasks, tiny_smol.d_model)
    assert set(res.fit) >= {"layer", "r2", "n_points", "family"}
    assert res.fit["n_points"] == 6 * 2  # Null is left out of the fit
    table = summarize(res)
    assert table["shots"].tolist() == [1, 2]
    cfg.save_activations = True
    out = res.save(tmp_path / "run")
    for name in ("config.json", "td.parquet", "accuracy.parquet", "predictions.parquet", "fit.json",
                 "activations_2shot.safetensors"):
        assert (out / name).exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["shots"] == [1, 2] and saved["family"] == "bitwise"
    back = load_sweep(out)
    pd.testing.assert_frame_equal(back.td, res.td)
    pd.testing.assert_frame_equal(back.predictions, res.predictions)
    assert back.fit.keys() == res.fit.keys()
    assert all(back.fit[k] == v or (v != v and back.fit[k] != back.fit[k]) for k, v in res.fit.items())
    torch.testing.assert_close(back.activations[2][0], res.activations[2][0], atol=0, rtol=0)
    assert back.config.shots == (1, 2)
    again = run_sweep(tiny_smol, cfg, progress=False)  # reproducible
    pd.testing.assert_frame_equal(again.td, res.td)
    pd.testing.assert_frame_equal(again.accuracy, res.accuracy)


def test_fit_recovers_a_linear_relation():
    rows_td, rows_acc = [], []
    for shots in (1, 4):
        for t, task in enumerate(["A", "B", "C", "null"]):
            value = 0.2 * t + 0.1 * shots
            for layer in range(3):
                rows_td.append({"layer": layer, "level": "task", "task": task, "td": value * (layer == 1),
                                "shots": shots})
            rows_td.append({"layer": 1, "level": "overall", "task": "all", "td": 0.9, "shots": shots})
            rows_td.append({"layer": 0, "level": "overall", "task": "all", "td": 0.1, "shots": shots})
            rows_acc.append({"task": task, "shots": shots, "exact": 0.5 * value + 0.05})
    fit = fit_td_accuracy(pd.DataFrame(rows_td), pd.DataFrame(rows_acc))
    assert fit["layer"] == 1 and fit["n_points"] == 6
    assert fit["r2"] == pytest.approx(1.0) and fit["slope"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fit layer 7"):
        fit_td_accuracy(pd.DataFrame(rows_td), pd.DataFrame(rows_acc), layer=7)


def test_sweep_figures(tiny_smol, tmp_path):
    from taskvec_interp.figures import sweep_figures

    res = run_sweep(tiny_smol, SweepConfig(family="bitwise", shots=(1, 2), n_per_task=8, n_boot=20, k=3),
                    progress=False)
    paths = sweep_figures(res, tmp_path)
    assert [p.name for p in paths][:4] == ["td_by_layer.png", "task_td.png", "task_td_heatmap.png",
                                           "td_vs_accuracy.png"]
    assert paths[4].name.startswith("umap_layer") and paths[4].name.endswith("_2shot.png")
    assert all(p.stat().st_size > 5000 for p in paths)


def test_saved_sweeps_record_the_real_model_and_take_ready_made_prompts(tiny_smol, tmp_path):
    from taskvec_interp.tasks import PromptBuilder

    fam = get_family("bitwise")
    prompts = PromptBuilder().build(fam, n_per_task=3, shots=2, seed=9)
    cfg = SweepConfig(shots=(2,), n_per_task=50, n_boot=10, k=1)  # n_per_task is ignored for given prompts
    tiny_smol.name = "tiny-smol-test"
    try:
        res = run_sweep(tiny_smol, cfg, fam, progress=False, prompts=prompts)
    finally:
        tiny_smol.name = None
    assert len(res.predictions) == len(prompts) and res.predictions["query"].tolist() == [p.query for p in prompts]
    out = res.save(tmp_path / "sweep")
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny-smol-test" != SweepConfig().model  # not the config's default name
    assert config["provenance"]["model"]["d_model"] == 32 and config["provenance"]["versions"]["torch"]
    back = load_sweep(out)
    assert back.model["name"] == "tiny-smol-test" and back.config.model == "tiny-smol-test"
    with pytest.raises(ValueError, match="no ready-made prompts with \\[4\\] shots"):
        run_sweep(tiny_smol, SweepConfig(shots=(4,)), fam, progress=False, prompts=prompts)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        res.save(tmp_path / "file")
