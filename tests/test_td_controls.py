"""TD gained from the context: the input-only and shuffled-label controls of a sweep (prompts, config checks,
the TD table's ``context`` column, ``td_points``, ``context_gain``, saved results, the figure and the CLI)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace as replace_

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from taskvec_interp.experiments.sweep import (
    DEMOS,
    GAIN_COLUMNS,
    POINT_COLUMNS,
    SweepConfig,
    SweepResult,
    context_gain,
    fit_td_accuracy,
    peak_layer_of,
    run_sweep,
    summarize,
)
from taskvec_interp.probes.decodability import task_decodability
from taskvec_interp.tasks import (
    ExampleTask,
    PromptBuilder,
    PromptTemplate,
    RandomOutputTask,
    TaskFamily,
    build_prompts,
    get_family,
)
from taskvec_interp.tasks.controls import (
    CONTROLS,
    control_prompts,
    input_only_prompts,
    shuffled_label_prompts,
)


def _lettered_family() -> TaskFamily:
    """Tasks whose outputs name their task (``A3``, ``B7``, ...): an output's task can be read off it."""
    tasks = [ExampleTask(name, [(f"{name.lower()}{i}", f"{name}{i}") for i in range(30)]) for name in "ABC"]
    null = RandomOutputTask([f"x{i}" for i in range(30)], outputs=[f"N{i}" for i in range(30)])
    return TaskFamily("lettered", tasks, null)


# ---- the control prompts ---------------------------------------------------------------------------------------
def test_input_only_prompts_are_the_zero_shot_prompts_of_the_same_queries():
    fam = get_family("bitwise")
    template = PromptTemplate(prefix="Compute:\n", input_prefix="Q: ", output_prefix=" =")
    prompts = build_prompts(fam, n_per_task=3, shots=4, seed=5, template=template)
    bare = input_only_prompts(prompts, template)
    assert len(bare) == len(prompts)
    for p, b in zip(prompts, bare, strict=True):
        assert (b.query, b.target, b.task, b.label, b.family) == (p.query, p.target, p.task, p.label, p.family)
        assert b.n_shots == 0 and b.demos == () and b.demo_answer_starts == ()
        assert b.text == f"Compute:\nQ: {p.query} =" and b.answer == p.answer
        assert b.text.count(" =") == 1 and p.text.count(" =") == 5  # one example: the query
    # the built 0-shot set holds the same queries in the same order: the input-only set IS it
    zero = build_prompts(fam, n_per_task=3, shots=0, seed=5, template=template)
    assert [b.text for b in bare] == [z.text for z in zero]


def test_shuffled_labels_come_from_other_tasks_and_are_seeded():
    fam = _lettered_family()
    prompts = PromptBuilder().build(fam, n_per_task=10, shots=5, seed=1)
    shuffled = shuffled_label_prompts(prompts, seed=3)
    pool = {(p.task, d.output) for p in prompts for d in p.demos}
    drawn_from = set()
    for p, s in zip(prompts, shuffled, strict=True):
        assert (s.query, s.target, s.task, s.label, s.answer, s.n_shots) == \
            (p.query, p.target, p.task, p.label, p.answer, p.n_shots)
        assert [d.input for d in s.demos] == [d.input for d in p.demos]
        own = "N" if p.task == "null" else p.task
        for d in s.demos:
            assert d.output[0] != own, (p.task, d.output)  # never the prompt's own task
            src = next(t for t, o in pool if o == d.output)
            assert src != p.task
            drawn_from.add(src)
        assert s.text.endswith(p.text.splitlines()[-1])  # the query line is unchanged
        assert s.text == PromptBuilder().render(
            type(s.demos[0])(s.query, s.target), s.demos, task=s.task, label=s.label, family=s.family).text
    assert drawn_from == {"A", "B", "C", "null"}  # every task gives outputs
    again = shuffled_label_prompts(prompts, seed=3)
    assert [p.text for p in again] == [p.text for p in shuffled]
    other = shuffled_label_prompts(prompts, seed=4)
    assert [p.text for p in other] != [p.text for p in shuffled]
    assert control_prompts("shuffled", prompts, seed=3) == shuffled
    assert control_prompts("input_only", prompts) == input_only_prompts(prompts)
    with pytest.raises(ValueError, match=r"unknown control 'bogus'; known: \('input_only', 'shuffled'\)"):
        control_prompts("bogus", prompts)


def test_shuffled_labels_need_two_tasks_with_demonstrations():
    fam = _lettered_family()
    one_task = PromptBuilder().build(fam, n_per_task=3, shots=2, seed=0, tasks=["A"])
    with pytest.raises(ValueError, match=r"task\(s\) \['A'\] have no other task's demonstration output"):
        shuffled_label_prompts(one_task)
    zero = PromptBuilder().build(fam, n_per_task=3, shots=0, seed=0)
    assert shuffled_label_prompts(zero) == zero  # nothing to shuffle
    with pytest.raises(ValueError, match="no prompts"):
        input_only_prompts([])


# ---- configuration ---------------------------------------------------------------------------------------------
def test_config_checks_the_controls():
    assert SweepConfig().controls == ()
    assert SweepConfig(controls=["shuffled", "input_only"]).controls == ("shuffled", "input_only")
    with pytest.raises(ValueError, match=r"SweepConfig\.controls must be a list of distinct names of "
                                         r"\('input_only', 'shuffled'\).*got 'labels' in \['labels'\]; known "
                                         r"controls: input_only, shuffled"):
        SweepConfig(controls=("labels",))
    with pytest.raises(ValueError, match=r"SweepConfig\.controls must be .*got 'input_only'$"):
        SweepConfig(controls="input_only")
    with pytest.raises(ValueError, match=r"must not list a control twice"):
        SweepConfig(controls=("shuffled", "shuffled"))
    with pytest.raises(ValueError, match=r"SweepConfig\.controls must be empty when no prompt has demonstrations.*"
                                         r"got \('input_only',\) with shots \(0,\)"):
        SweepConfig(shots=(0,), controls=("input_only",))
    assert SweepConfig(shots=(0, 2), controls=("input_only",)).controls == ("input_only",)
    raw = json.loads(json.dumps(dataclasses.asdict(SweepConfig(controls=("input_only", "shuffled")))))
    assert SweepConfig(**raw) == SweepConfig(controls=("input_only", "shuffled"))  # a saved config reads back
    assert SweepConfig(controls=("shuffled",), shuffled_shots=[10]).shuffled_shots == (10,)
    with pytest.raises(ValueError, match=r"SweepConfig\.shuffled_shots=\[4\] needs the 'shuffled' control, but "
                                         r"controls=\['input_only'\]"):
        SweepConfig(controls=("input_only",), shuffled_shots=(4,))
    with pytest.raises(ValueError, match=r"SweepConfig\.shuffled_shots must list shot counts of the sweep "
                                         r"\(\[1, 4, 10\]\), got \[5\]"):
        SweepConfig(controls=("shuffled",), shuffled_shots=(4, 5))
    with pytest.raises(ValueError, match=r"SweepConfig\.shuffled_shots"):
        SweepConfig(shots=(0, 4), controls=("shuffled",), shuffled_shots=(0,))  # no demonstrations to shuffle


class _NoModel:
    """An adapter that fails the moment the sweep touches the model: errors must come before."""

    def __getattr__(self, name):
        raise AssertionError(f"model work started ({name}) before the bad input was refused")


def test_bad_controls_are_refused_before_any_model_work():
    cfg = SweepConfig(shots=(2,), n_per_task=4, k=1, controls=("input_only",))
    cfg.shots = (0,)  # changed after the checks ran
    with pytest.raises(ValueError, match=r"SweepConfig\.controls must be empty when no prompt has demonstrations"):
        run_sweep(_NoModel(), cfg, progress=False)
    fam = get_family("bitwise")
    two = PromptBuilder().build(fam, n_per_task=3, shots=2, seed=0)
    four = PromptBuilder().build(fam, n_per_task=3, shots=4, seed=1)  # other queries
    with pytest.raises(ValueError, match=r"input-only control needs the same queries at every shot count > 0"):
        run_sweep(_NoModel(), SweepConfig(shots=(2, 4), n_per_task=3, k=1, controls=("input_only",)), fam,
                  progress=False, prompts=two + four)
    lettered = _lettered_family()
    only_a = PromptBuilder().build(lettered, n_per_task=4, shots=2, seed=0, tasks=["A"])
    with pytest.raises(ValueError, match=r"have no other task's demonstration output"):
        run_sweep(_NoModel(), SweepConfig(shots=(2,), n_per_task=4, k=1, controls=("shuffled",)), lettered,
                  progress=False, prompts=only_a)


# ---- the sweep with controls ------------------------------------------------------------------------------------
N_PER_TASK = 6


@pytest.fixture(scope="module")
def controlled(tiny_smol):
    cfg = SweepConfig(family="bitwise", shots=(1, 2), n_per_task=N_PER_TASK, k=2, n_boot=50, batch_size=64,
                      controls=("input_only", "shuffled"))
    return run_sweep(tiny_smol, cfg, progress=False)


def test_td_table_has_a_context_column_and_the_controls_rows(controlled, tiny_smol):
    td = controlled.td
    overall = td[td["level"] == "overall"]
    got = {(c, s) for c, s in zip(overall["context"], overall["shots"], strict=True)}
    assert got == {(DEMOS, 1), (DEMOS, 2), ("shuffled", 1), ("shuffled", 2), ("input_only", 0)}
    assert overall.groupby(["context", "shots"]).size().eq(tiny_smol.n_layers).all()
    assert list(td.columns[-3:]) == ["shots", "context", "family"]
    assert len(controlled.accuracy) == 7 * 2  # the controls need no generation


def test_control_td_is_the_td_of_the_control_prompts_of_the_same_queries(controlled, tiny_smol):
    cfg = controlled.config
    fam = get_family("bitwise")
    two = build_prompts(fam, n_per_task=N_PER_TASK, shots=2, seed=cfg.seed)
    expected = {"input_only": build_prompts(fam, n_per_task=N_PER_TASK, shots=0, seed=cfg.seed),  # = the zero-shot prompts
                "shuffled": shuffled_label_prompts(two, seed=cfg.seed)}
    for context, shots in (("input_only", 0), ("shuffled", 2)):
        prompts = expected[context]
        acts = tiny_smol.capture([p.text for p in prompts], progress=False)
        want = task_decodability(acts, [p.label for p in prompts], k=2, label_names=fam.task_names, n_boot=50,
                                 seed=cfg.seed).to_frame()
        rows = controlled.td[(controlled.td["context"] == context) & (controlled.td["shots"] == shots)]
        np.testing.assert_array_equal(rows["td"].to_numpy(), want["td"].to_numpy())
    # a control changes the numbers: shuffled-label TD is not the k-shot TD
    demos = controlled.td[(controlled.td["context"] == DEMOS) & (controlled.td["shots"] == 2)]
    shuffled = controlled.td[(controlled.td["context"] == "shuffled") & (controlled.td["shots"] == 2)]
    assert not np.array_equal(demos["td"].to_numpy(), shuffled["td"].to_numpy())


def test_td_points_aggregate_exactly_to_the_td_table(controlled):
    points = controlled.td_points
    assert tuple(points.columns) == POINT_COLUMNS
    assert points["correct"].dtype == bool
    n = 7 * N_PER_TASK
    for (shots, context), part in points.groupby(["shots", "context"]):
        assert sorted(set(part["index"])) == list(range(n))
        mean = part.groupby("layer")["correct"].mean()
        rows = controlled.td[(controlled.td["shots"] == shots) & (controlled.td["context"] == context)]
        overall = rows[rows["level"] == "overall"].set_index("layer")["td"]
        assert (mean.reindex(overall.index).to_numpy() == overall.to_numpy()).all()  # exactly
        per_task = part.groupby(["layer", "task"])["correct"].mean()
        tasks = rows[rows["level"] == "task"].set_index(["layer", "task"])["td"]
        assert (per_task.reindex(tasks.index).to_numpy() == tasks.to_numpy()).all()
    # the same index is the same query (task) in every context
    at0 = points[points["layer"] == points["layer"].min()]
    tasks = at0.pivot_table(index="index", columns=["context", "shots"], values="task", aggfunc="first")
    assert (tasks.nunique(axis=1) == 1).all()


def test_peaks_fit_and_summary_read_only_the_k_shot_rows(controlled, tiny_smol):
    plain = run_sweep(tiny_smol, dataclasses.replace(controlled.config, controls=()), progress=False)
    demos = controlled.td[controlled.td["context"] == DEMOS].reset_index(drop=True)
    pd.testing.assert_frame_equal(demos, plain.td)
    pd.testing.assert_frame_equal(summarize(controlled), summarize(plain))
    assert controlled.fit == plain.fit
    assert peak_layer_of(controlled.td, 2) == peak_layer_of(plain.td, 2)
    assert (plain.td_points["context"] == DEMOS).all()
    # a constructed table: controls far above the k-shot rows never decide the peak or the fit
    rows = []
    for context, shots, bump in ((DEMOS, 4, 0.0), ("shuffled", 4, 0.5), ("input_only", 0, 0.6)):
        for layer in range(3):
            v = 0.3 + 0.1 * (layer == 1) + bump * (layer == 2)
            rows.append({"layer": layer, "level": "overall", "task": "all", "td": v, "shots": shots,
                         "context": context})
            rows += [{"layer": layer, "level": "task", "task": t, "td": v + 0.1 * i, "shots": shots,
                      "context": context} for i, t in enumerate("abc")]
    td = pd.DataFrame(rows)
    acc = pd.DataFrame({"task": list("abc"), "shots": 4, "exact": [0.1, 0.2, 0.4]})
    assert peak_layer_of(td) == 1 and peak_layer_of(td, 4) == 1
    assert fit_td_accuracy(td, acc)["layer"] == 1
    with pytest.raises(ValueError, match="no 0-shot rows"):
        peak_layer_of(td, 0)  # the input-only rows are not 0-shot k-shot rows


def test_context_gain_pairs_points_and_matches_the_tables(controlled):
    gain = context_gain(controlled)
    assert tuple(gain.columns) == GAIN_COLUMNS
    assert set(zip(gain["shots"], gain["control"], gain["control_shots"], strict=True)) == \
        {(1, "input_only", 0), (2, "input_only", 0), (1, "shuffled", 1), (2, "shuffled", 2)}
    td = controlled.td[controlled.td["level"] == "overall"]
    for r in gain.itertuples():
        d = td[(td["context"] == DEMOS) & (td["shots"] == r.shots) & (td["layer"] == r.layer)]["td"].item()
        c = td[(td["context"] == r.control) & (td["shots"] == r.control_shots) & (td["layer"] == r.layer)]["td"].item()
        assert r.td_demos == pytest.approx(d, abs=1e-12) and r.td_control == pytest.approx(c, abs=1e-12)
        assert r.gain == pytest.approx(d - c, abs=1e-12)
        assert r.ci_low <= r.gain + 1e-12 and r.gain - 1e-12 <= r.ci_high and 0 <= r.p_value <= 1
        assert r.n == 7 * N_PER_TASK and r.task == "all"
    by_task = context_gain(controlled, by_task=True, n_boot=0)
    assert set(by_task["task"]) == {"all", *get_family("bitwise").task_names}
    assert by_task[by_task["task"] != "all"]["n"].eq(N_PER_TASK).all() and by_task["ci_low"].isna().all()


def _points(context: str, shots: int, correct: list[list[bool]], tasks: list[str]) -> pd.DataFrame:
    rows = [{"layer": layer, "shots": shots, "context": context, "index": i, "task": tasks[i], "correct": c}
            for layer, row in enumerate(correct) for i, c in enumerate(row)]
    return pd.DataFrame(rows, columns=list(POINT_COLUMNS))


def _result_with_points(points: pd.DataFrame) -> SweepResult:
    cfg = SweepConfig(shots=(4,), n_per_task=10, k=3, n_boot=400, controls=("input_only", "shuffled"))
    return SweepResult(cfg, pd.DataFrame({"layer": [0], "level": ["overall"], "task": ["all"], "td": [0.5],
                                          "shots": [4]}),
                       pd.DataFrame(), pd.DataFrame(), {}, td_points=points)


def test_context_gain_bootstrap_is_paired_over_the_same_queries():
    rng = np.random.default_rng(0)
    tasks = ["a", "b"] * 20
    same = rng.random((2, 40)) < 0.5
    same[1, :10] = True
    bare = same.copy()
    bare[1, :10] = False  # layer 1: ten points lose their vote without demonstrations
    points = pd.concat([_points(DEMOS, 4, same.tolist(), tasks), _points("shuffled", 4, same.tolist(), tasks),
                        _points("input_only", 0, bare.tolist(), tasks)], ignore_index=True)
    gain = context_gain(_result_with_points(points)).set_index(["control", "layer"])
    # identical correctness point by point: gain 0 with a zero-width CI (an unpaired bootstrap would be wide)
    assert gain.loc[("shuffled", 0), ["gain", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    assert gain.loc[("shuffled", 1), "p_value"] == 1.0
    assert gain.loc[("input_only", 1), "gain"] == pytest.approx(10 / 40)
    assert gain.loc[("input_only", 1), "ci_low"] > 0 and gain.loc[("input_only", 1), "p_value"] < 0.01
    assert gain.loc[("input_only", 0), "gain"] == 0.0
    again = context_gain(_result_with_points(points)).set_index(["control", "layer"])
    pd.testing.assert_frame_equal(gain, again)  # seeded
    mixed = points.copy()
    mixed.loc[(mixed["context"] == "input_only") & (mixed["index"] == 0), "task"] = "b"
    with pytest.raises(ValueError, match=r"input_only points \(0 shots\) are not the 4-shot points' queries"):
        context_gain(_result_with_points(mixed))
    with pytest.raises(ValueError, match=r"no control rows .*SweepConfig\.controls"):
        context_gain(_result_with_points(_points(DEMOS, 4, same.tolist(), tasks)))


# ---- saved results ----------------------------------------------------------------------------------------------
def test_td_points_round_trip_and_old_sweeps_still_load(controlled, tmp_path):
    out = controlled.save(tmp_path / "sweep")
    assert (out / "td_points.parquet").exists()
    back = SweepResult.load(out)
    pd.testing.assert_frame_equal(back.td, controlled.td)
    pd.testing.assert_frame_equal(back.td_points, controlled.td_points)
    assert back.config.controls == ("input_only", "shuffled")
    pd.testing.assert_frame_equal(context_gain(back), context_gain(controlled))
    # a sweep written before the controls: no context column, no td_points file
    from taskvec_interp.io import write_result_dir

    old_td = controlled.td[controlled.td["context"] == DEMOS].drop(columns="context")
    raw = dataclasses.asdict(controlled.config)
    raw.pop("controls")
    legacy = tmp_path / "legacy"
    with write_result_dir(legacy, "sweep", raw) as tmp:
        (tmp / "config.json").write_text(json.dumps(raw))
        old_td.to_parquet(tmp / "td.parquet", index=False)
        controlled.accuracy.to_parquet(tmp / "accuracy.parquet", index=False)
        controlled.predictions.to_parquet(tmp / "predictions.parquet", index=False)
        (tmp / "fit.json").write_text(json.dumps({k: v for k, v in controlled.fit.items()}))
    old = SweepResult.load(legacy)
    assert (old.td["context"] == DEMOS).all() and list(old.td.columns) == list(controlled.td.columns)
    assert old.td_points.empty and tuple(old.td_points.columns) == POINT_COLUMNS
    assert old.config.controls == ()
    assert peak_layer_of(old.td, 2) == peak_layer_of(controlled.td, 2)
    pd.testing.assert_frame_equal(summarize(old), summarize(controlled))


# ---- figure and command line ------------------------------------------------------------------------------------
def test_context_figure_and_the_ordinary_figures_ignore_the_controls(controlled, tmp_path):
    from matplotlib.figure import Figure

    from taskvec_interp import figures

    path = tmp_path / "ctx.png"
    fig = figures.plot_td_context(controlled.td, path=path)
    assert isinstance(fig, Figure) and path.stat().st_size > 5000
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["1-shot", "2-shot", "1-shot, shuffled labels", "2-shot, shuffled labels",
                      "input only (0-shot)", "chance"]
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["2-shot"] == "-" and styles["2-shot, shuffled labels"] == "--" and styles["input only (0-shot)"] == ":"
    two = pd.concat([controlled.td.assign(family="a"), controlled.td.assign(family="b")], ignore_index=True)
    assert len(figures.plot_td_context(two).axes) == 2  # one panel per family
    with pytest.raises(ValueError, match="no control rows"):
        figures.plot_td_context(controlled.td[controlled.td["context"] == DEMOS])
    by_layer = figures.plot_td_by_layer(controlled.td)
    assert [line.get_label() for line in by_layer.axes[0].get_lines()] == ["1-shot", "2-shot", "chance"]
    peaks = figures.td_peaks(controlled.td)
    assert peaks["shots"].tolist() == [1, 2]
    paths = figures.sweep_figures(controlled, tmp_path, umap=False)
    assert paths[-1].name == "td_context.png" and paths[-1].stat().st_size > 5000


def test_the_cli_reads_the_controls_from_the_config():
    from taskvec_interp.cli_config import config_command

    got = {}
    probe = typer.Typer()

    @probe.command()
    @config_command(SweepConfig)
    def run(config: SweepConfig) -> None:
        got["config"] = config

    runner = CliRunner()
    res = runner.invoke(probe, ["--controls", "input_only,shuffled", "--shots", "4"])
    assert res.exit_code == 0, res.output
    assert got["config"] == SweepConfig(shots=(4,), controls=("input_only", "shuffled"))
    res = runner.invoke(probe, ["--controls", "input_only,labels"])
    assert isinstance(res.exception, ValueError) and "known controls: input_only, shuffled" in str(res.exception)
    res = runner.invoke(probe, [])
    assert got["config"].controls == ()
    from taskvec_interp.cli import app

    help_text = " ".join(runner.invoke(app, ["td", "--help"], terminal_width=2000).output.split())
    assert "--controls" in help_text and all(c in help_text for c in CONTROLS)


def _count_captures(adapter, monkeypatch) -> list[int]:
    """The number of prompts of every ``capture`` call the adapter's class gets from now on (appended as they run)."""
    calls: list[int] = []
    real = type(adapter).capture

    def counting(self, prompts, *a, **k):
        calls.append(len(prompts))
        return real(self, prompts, *a, **k)

    monkeypatch.setattr(type(adapter), "capture", counting)
    return calls


def test_the_control_activations_are_one_capture_per_prompt_set(tiny_smol, monkeypatch):
    """Each control costs one capture pass (no generation), and an input-only set equal to the sweep's own 0-shot
    set costs none."""
    calls = _count_captures(tiny_smol, monkeypatch)
    cfg = SweepConfig(shots=(0, 2), n_per_task=4, k=2, n_boot=0, batch_size=64, controls=("input_only", "shuffled"))
    res = run_sweep(tiny_smol, cfg, _lettered_family(), progress=False)
    assert [c for c in calls if c > 1] == [4 * 4]  # the shuffled 2-shot set; input only reuses the 0-shot set's pass
    zero = res.td[(res.td["shots"] == 0)]
    np.testing.assert_array_equal(zero[zero["context"] == DEMOS]["td"].to_numpy(),
                                  zero[zero["context"] == "input_only"]["td"].to_numpy())
    assert torch.is_tensor(res.activations[2][1])


def test_the_shuffled_control_runs_only_at_the_shot_counts_asked(tiny_smol, monkeypatch):
    """shuffled_shots=(4,): one shuffled capture pass (the 4-shot set), none at 2 shots; its TD rows are those of
    the full control at 4 shots, number for number."""
    fam = _lettered_family()
    full = run_sweep(tiny_smol, SweepConfig(shots=(2, 4), n_per_task=4, k=2, n_boot=0, batch_size=64,
                                            controls=("shuffled",)), fam, progress=False)
    calls = _count_captures(tiny_smol, monkeypatch)
    cfg = SweepConfig(shots=(2, 4), n_per_task=4, k=2, n_boot=0, batch_size=64, controls=("shuffled",),
                      shuffled_shots=(4,))
    res = run_sweep(tiny_smol, cfg, fam, progress=False)
    assert [c for c in calls if c > 1] == [4 * 4]  # k-shot sets are captured while generating; one shuffled pass
    shuffled = res.td[res.td["context"] == "shuffled"]
    assert set(shuffled["shots"]) == {4}
    want = full.td[(full.td["context"] == "shuffled") & (full.td["shots"] == 4)]
    np.testing.assert_array_equal(shuffled["td"].to_numpy(), want["td"].to_numpy())


def test_sweep_draws_queries_with_replacement_when_asked(tiny_smol):
    from taskvec_interp.tasks import bitwise_family

    fam = bitwise_family(n_bits=1)  # 4 distinct inputs per task: 6 queries need replacement
    cfg = SweepConfig(family="bitwise", family_kwargs={"n_bits": 1}, shots=(1, 2), n_per_task=6, k=3, n_boot=0,
                      replace=True, controls=("shuffled",))
    res = run_sweep(tiny_smol, cfg, family=fam, progress=False)
    q = res.predictions.groupby("shots")["query"].apply(list)
    assert q[1] == q[2] and len(q[1]) == 6 * len(fam.task_names)  # the same draws at every shot count
    with pytest.raises(ValueError, match="replace"):  # without it, the same request is refused naming the option
        run_sweep(tiny_smol, replace_(cfg, replace=False), family=fam, progress=False)
