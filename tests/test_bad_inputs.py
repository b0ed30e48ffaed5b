"""The bad-input suite: every case is refused with a clear error before any work, the message names the
offending value, and nothing partial is left on disk (each case runs in its own empty directory, which must
hold exactly what it held before). Cases span the configs, TD, the adapters and hooks, model loading,
result and checkpoint readers, trajectories and the command line.

Readers of treebanks and task folders have their own cases in tests/test_readers.py; fault tolerance of
long runs (torn checkpoints) is in tests/test_faults.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, random_prompts
from typer.testing import CliRunner

from taskvec_interp import hooks as H
from taskvec_interp.adapters import TorchHooksAdapter, load_model
from taskvec_interp.adapters.arch import find_arch
from taskvec_interp.cli import app
from taskvec_interp.engine import local_checkpoints, run_checkpoints
from taskvec_interp.experiments.finetune import FinetuneConfig
from taskvec_interp.experiments.patching import PatchConfig, load_patching
from taskvec_interp.experiments.sweep import SweepConfig, load_sweep
from taskvec_interp.experiments.trajectory import TrajectoryConfig
from taskvec_interp.hooks import HookContext, Site, last_token
from taskvec_interp.probes.decodability import task_decodability
from taskvec_interp.synthetic import train_config
from taskvec_interp.synthetic.analysis import AnalysisConfig
from taskvec_interp.synthetic.data import MSLRConfig
from taskvec_interp.synthetic.train import load_checkpoint

PROMPTS = random_prompts(4, seed=1)


class Env:
    """What a case may use: a scratch directory, a tiny adapter, a runner for the CLI."""

    def __init__(self, tmp: Path, tok) -> None:
        self.tmp = tmp
        self.tok = tok
        self._adapter = None

    @property
    def adapter(self) -> TorchHooksAdapter:
        if self._adapter is None:
            self._adapter = TorchHooksAdapter(build_tiny("llama"), self.tok)
        return self._adapter

    def cli(self, *args: str):
        res = CliRunner(env={"COLUMNS": "400"}).invoke(app, list(args))
        if res.exit_code == 0:
            raise AssertionError(f"CLI accepted {args}: {res.output}")
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        raise ValueError(res.output)  # a typer usage error: its text is the message


def _wrong_shape(act, hook):
    return act[:, :-1]


def _wrong_dtype(act, hook):
    return act.double()


def _torn_checkpoint(env: Env) -> Path:
    d = env.tmp / "step_0000010"
    d.mkdir()
    (d / "model_config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return d


def _incomplete_sweep(env: Env) -> Path:
    d = env.tmp / "sweep"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _corrupt_patch(env: Env) -> Path:
    d = env.tmp / "patch"
    d.mkdir()
    for f in ("config.json", "summary.json", "accuracy.parquet", "predictions.parquet", "td.parquet",
              "relation.parquet"):
        (d / f).write_text("x")
    (d / "config.json").write_text("{torn")
    return d


def _metrics(env: Env) -> Path:
    (env.tmp / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    return env.tmp


class NoPadTokenizer:
    pad_token_id = None
    eos_token = None
    name_or_path = "bare"


def _cli_spy(monkeypatch_calls: list) -> Callable:
    def fake_load(*a, **k):
        monkeypatch_calls.append(a)
        raise AssertionError("the model was loaded before the bad input was refused")

    return fake_load


# (id, error type, regex the message must match (it names the value), the call)
CASES: list[tuple[str, type[Exception], str, Callable[[Env], object]]] = [
    # --- TD sweep config
    ("sweep-shots-empty", ValueError, r"shots must be a non-empty list.*\(\)", lambda e: SweepConfig(shots=())),
    ("sweep-shots-twice", ValueError, r"SweepConfig\.shots must not list a value twice, got \[1, 1\]",
     lambda e: SweepConfig(shots=(1, 1))),
    ("sweep-shots-float", ValueError, r"SweepConfig\.shots must be a non-empty list of ints >= 0, got 1\.5",
     lambda e: SweepConfig(shots=(1.5,))),
    ("sweep-n-bool", ValueError, r"n_per_task must be an int >= 1, got True", lambda e: SweepConfig(n_per_task=True)),
    ("sweep-k-zero", ValueError, r"k must be an int >= 1, got 0", lambda e: SweepConfig(k=0)),
    ("sweep-k-vs-n", ValueError, r"SweepConfig\.k must be <= n_per_task - 2 = 3 .*got 10",
     lambda e: SweepConfig(n_per_task=5)),
    ("sweep-metric", ValueError, r"metric must be one of .*'manhattan'", lambda e: SweepConfig(metric="manhattan")),
    ("sweep-layers-float", ValueError, r"SweepConfig\.layers must be ints, got 1\.7",
     lambda e: SweepConfig(layers=[1.7])),
    ("sweep-layers-word", ValueError, r"SweepConfig\.layers must be 'all', 'first:K', .*got 'some'",
     lambda e: SweepConfig(layers="some")),
    ("sweep-layers-peak", ValueError, r"SweepConfig\.layers must be 'all', 'first:K', .*got 'peak'",
     lambda e: SweepConfig(layers="peak")),
    ("sweep-template-key", ValueError, r"SweepConfig\.template must hold PromptTemplate fields .*\['sep'\]",
     lambda e: SweepConfig(template={"sep": " | "})),
    ("sweep-backend", ValueError, r"backend must be one of .*'jax'", lambda e: SweepConfig(backend="jax")),
    ("sweep-n-boot", ValueError, r"n_boot must be an int >= 0, got -1", lambda e: SweepConfig(n_boot=-1)),
    ("sweep-max-new", ValueError, r"max_new_tokens must be an int >= 1, got 0", lambda e: SweepConfig(max_new_tokens=0)),
    # --- synthetic training config (optimiser settings refused before anything is written)
    ("train-lr-inf", ValueError, r"lr must be a finite number, got inf", lambda e: train_config("tiny", lr=math.inf)),
    ("train-lr-neg", ValueError, r"lr must be > 0\.0, got -0\.1", lambda e: train_config("tiny", lr=-0.1)),
    ("train-clip-neg", ValueError, r"grad_clip must be > 0\.0, got -1\.0", lambda e: train_config("tiny", grad_clip=-1.0)),
    ("train-clip-zero", ValueError, r"grad_clip must be > 0\.0, got 0\.0", lambda e: train_config("tiny", grad_clip=0.0)),
    ("train-beta-one", ValueError, r"betas\[1\] must be in \[0\.0, 1\.0\), got 1\.0",
     lambda e: train_config("tiny", betas=(0.9, 1.0))),
    ("train-beta-neg", ValueError, r"betas\[0\] must be in .*got -0\.1", lambda e: train_config("tiny", betas=(-0.1, 0.9))),
    ("train-eps-zero", ValueError, r"eps must be > 0\.0, got 0\.0", lambda e: train_config("tiny", eps=0.0)),
    ("train-steps-float", ValueError, r"steps must be an int >= 0, got 2\.5", lambda e: train_config("tiny", steps=2.5)),
    ("train-batch-bool", ValueError, r"batch_size must be an int >= 1, got True", lambda e: train_config("tiny", batch_size=True)),
    ("train-schedule", ValueError, r"lr_schedule must be one of .*'linear'", lambda e: train_config("tiny", lr_schedule="linear")),
    ("train-autocast", ValueError, r"autocast_dtype must be one of .*'int8'", lambda e: train_config("tiny", autocast_dtype="int8")),
    ("train-bases-too-many", ValueError, r"rank=4 \* n_bases=6 = 24 > n_dims=16", lambda e: MSLRConfig(n_bases=6)),
    # --- patching and fine-tuning configs
    ("patch-layers-float", ValueError, r"layers must be ints, got 1\.7", lambda e: PatchConfig(layers=[1.7])),
    ("patch-scale-nan", ValueError, r"scale must be a finite number, got nan", lambda e: PatchConfig(scale=math.nan)),
    ("patch-k-vs-n", ValueError, r"PatchConfig\.k must be <= n_per_task - 2 = 1 .*got 10",
     lambda e: PatchConfig(n_per_task=3, td=True)),  # the k-NN check: only where TD is computed
    ("patch-k-vs-vector-prompts", ValueError, r"PatchConfig\.k must be <= n_vector_prompts - 2 = 2 .*got 10",
     lambda e: PatchConfig(zero_shot=True, n_vector_prompts=4, td=True)),
    ("patch-mode", ValueError, r"PatchConfig\.modes must be a non-empty list of .*got 'swap'",
     lambda e: PatchConfig(modes=("swap",))),
    ("patch-n-boot", ValueError, r"PatchConfig\.n_boot must be an int >= 0, got -1", lambda e: PatchConfig(n_boot=-1)),
    ("patch-shots-zero", ValueError, r"PatchConfig\.shots must be an int >= 1 .*got 0", lambda e: PatchConfig(shots=0)),
    ("finetune-k-vs-n", ValueError, r"FinetuneConfig\.k must be <= n_per_task - 2 = 3 .*got 10",
     lambda e: FinetuneConfig(n_per_task=5)),
    ("finetune-layers-k", ValueError, r"FinetuneConfig\.layers must be .*got 'first:0': K must be >= 1$",
     lambda e: FinetuneConfig(layers="first:0")),
    ("finetune-layers-peak", ValueError, r"FinetuneConfig\.layers must be 'all', 'td:encoder', .*got 'peak'",
     lambda e: FinetuneConfig(layers="peak")),
    ("finetune-clip-zero", ValueError, r"grad_clip must be > 0\.0, got 0\.0", lambda e: FinetuneConfig(grad_clip=0.0)),
    ("finetune-lr-nan", ValueError, r"lr must be a finite number, got nan", lambda e: FinetuneConfig(lr=math.nan)),
    ("finetune-dropout", ValueError, r"dropout must be in \[0\.0, 1\.0\), got 1\.0", lambda e: FinetuneConfig(dropout=1.0)),
    ("finetune-method", ValueError, r"FinetuneConfig\.method must be one of \('lora', 'full'\), got 'qlora'",
     lambda e: FinetuneConfig(method="qlora")),
    ("finetune-seed", ValueError, r"FinetuneConfig\.seed must be an int >= 0, got -1", lambda e: FinetuneConfig(seed=-1)),
    ("trajectory-k-vs-n", ValueError, r"TrajectoryConfig\.k must be <= n_per_task - 2 = 1 .*got 10",
     lambda e: TrajectoryConfig(n_per_task=3)),
    ("analysis-k-vs-n", ValueError, r"AnalysisConfig\.k must be <= n_per_basis - 2 = 3 .*got 10",
     lambda e: AnalysisConfig(n_per_basis=5)),
    ("analysis-position", ValueError, r"AnalysisConfig\.patch_position must be 'context' or an int <= -2 .*got -1",
     lambda e: AnalysisConfig(patch_position=-1)),
    ("analysis-head-mode", ValueError, r"AnalysisConfig\.head_mode must be one of \('mean', 'zero'\), got 'max'",
     lambda e: AnalysisConfig(head_mode="max")),
    # --- task decodability
    ("td-k-class", ValueError, r"k = 3 is not below .*task 'b' has 4 points",
     lambda e: task_decodability(torch.randn(12, 3), ["a"] * 8 + ["b"] * 4, k=3, n_boot=0)),
    ("td-k-float", ValueError, r"k must be an int, got 2\.0", lambda e: task_decodability(torch.randn(12, 3), [0, 1] * 6, k=2.0)),
    ("td-labels-n", ValueError, r"n = 12 points but labels has 10", lambda e: task_decodability(torch.randn(12, 3), [0, 1] * 5, k=1)),
    ("td-small-flag", ValueError, r"small_classes must be 'error' or 'warn', got 'skip'",
     lambda e: task_decodability(torch.randn(12, 3), [0, 1] * 6, k=1, small_classes="skip")),
    # --- adapters and hooks
    ("capture-layer-float", ValueError, r"layers must be ints, got 1\.7", lambda e: e.adapter.capture(PROMPTS, layers=[1.7])),
    ("capture-layer-bool", ValueError, r"layers must be ints, got True", lambda e: e.adapter.capture(PROMPTS, layers=[True])),
    ("capture-layer-range", ValueError, r"layer 3 out of range for a model with 3 layers",
     lambda e: e.adapter.capture(PROMPTS, layers=[0, 3])),
    ("capture-int-dtype", ValueError, r"floating-point torch.dtype, got torch.int64",
     lambda e: e.adapter.capture(PROMPTS, dtype=torch.int64)),
    ("capture-float-positions", TypeError, r"position must hold integers, got a tensor of dtype torch.float32",
     lambda e: e.adapter.capture(PROMPTS, position=torch.tensor([-1.0] * 4))),
    ("capture-position-range", ValueError, r"position -50 out of range for prompt",
     lambda e: e.adapter.capture(PROMPTS, position=-50)),
    ("tl-hook-shape", ValueError, r"hook at blocks\.1\.hook_resid_post returned shape",
     lambda e: e.adapter.forward(PROMPTS, hooks=[(Site(1), _wrong_shape)])),
    ("hook-dtype", ValueError, r"returned dtype torch.float64, expected torch.float32",
     lambda e: e.adapter.forward(PROMPTS, hooks=[("blocks.0.hook_attn_out", _wrong_dtype)])),
    ("site-component", ValueError, r"unknown site component 'attn_z' in 'blocks.0.hook_attn_z'",
     lambda e: e.adapter.forward(PROMPTS, hooks=[("blocks.0.hook_attn_z", H.ablate())])),
    ("names-filter-none", ValueError, r"names_filter selected none of this model's 12 sites",
     lambda e: e.adapter.capture_sites(PROMPTS, names_filter=lambda n: "z" in n)),
    ("mask-hole", ValueError, r"row 0 is not one contiguous run of real tokens: \[1, 0, 1\]",
     lambda e: HookContext.from_attention_mask(torch.tensor([[1, 0, 1]]))),
    ("last-token-mask", ValueError, r"attention_mask has shape \[2, 3\]",
     lambda e: last_token(torch.zeros(2, 4, 8), torch.ones(2, 3))),
    ("generate-zero", ValueError, r"max_new_tokens must be a positive int, got 0",
     lambda e: e.adapter.generate(PROMPTS, 0)),
    ("vector-size", ValueError, r"vector for blocks\.1\.hook_resid_post has size 7, the model's d_model is 32",
     lambda e: e.adapter.forward(PROMPTS, hooks=[(Site(1), H.add(torch.ones(7)))])),
    ("as-tl-hook-fn", TypeError, r"as_tl_hook needs a callable hook function, got int", lambda e: H.as_tl_hook(3)),
    # --- model loading
    ("load-backend", ValueError, r"unknown backend 'jax'", lambda e: load_model("smollm2-135m", backend="jax")),
    ("load-remote-torch", ValueError, r"remote=True runs through NDIF.*got backend 'torch'",
     lambda e: load_model("org/model", remote=True)),
    ("load-device-both", ValueError, r"not both \(got device='cpu'", lambda e: load_model("org/m", device="cpu", device_map="auto")),
    ("load-disk-no-folder", ValueError, r"'disk': pass offload_folder=",
     lambda e: load_model("org/m", device_map={"model": "disk"})),
    ("load-device-map-word", ValueError, r"device_map 'everywhere' is none of", lambda e: load_model("org/m", device_map="everywhere")),
    ("load-revision-local", ValueError, r"revision='step1000-tokens4B' applies to hub ids",
     lambda e: load_model(str(e.tmp), revision="step1000-tokens4B")),
    ("load-empty-dir", ValueError, r"has no config\.json \(has nothing\)", lambda e: load_model(str(e.tmp))),
    ("load-missing-path", ValueError, r"cannot resolve model spec './no/such/dir'", lambda e: load_model("./no/such/dir")),
    ("load-spec-type", TypeError, r"model spec must be .* got int", lambda e: load_model(42)),
    ("tokenizer-no-pad-no-eos", ValueError, r"tokenizer NoPadTokenizer \('bare'\) has neither a pad token nor an EOS",
     lambda e: TorchHooksAdapter(build_tiny("gpt2"), NoPadTokenizer())),
    ("no-block-list", ValueError, r"no architecture row for Linear .* Pass blocks='path.to.ModuleList'", lambda e: find_arch(torch.nn.Linear(3, 3))),
    # --- readers of results and checkpoints
    ("load-sweep-missing", ValueError, r"sweep directory '.*nowhere' cannot be read: it does not exist",
     lambda e: load_sweep(e.tmp / "nowhere")),
    ("load-sweep-incomplete", ValueError, r"sweep directory '.*sweep' cannot be read: no result\.json",
     lambda e: load_sweep(_incomplete_sweep(e))),
    ("load-patching-json", ValueError, r"patch' cannot be read: no result\.json", lambda e: load_patching(_corrupt_patch(e))),
    ("checkpoint-torn", ValueError, r"step_0000010/model\.safetensors is unreadable",
     lambda e: load_checkpoint(_torn_checkpoint(e))),
    ("checkpoint-missing", ValueError, r"checkpoint .*step_9 cannot be loaded: no manifest\.json",
     lambda e: load_checkpoint(e.tmp / "step_9")),
    ("metrics-middle", ValueError, r"metrics\.jsonl line 2 is not a metrics record", lambda e: __import__(
        "taskvec_interp.checkpoints", fromlist=["read_metrics"]).read_metrics(_metrics(e))),
    # --- trajectories
    ("trajectory-empty", ValueError, r"no checkpoints given",
     lambda e: run_checkpoints([], lambda m, c: {}, lambda c: None, progress=False)),
    ("trajectory-dup-steps", ValueError, r"checkpoints 0 and 1 .* both have step 5",
     lambda e: run_checkpoints(local_checkpoints([e.tmp / "a", e.tmp / "b"], steps=[5, 5]), lambda m, c: {},
                               lambda c: None, progress=False)),
    # --- the command line (config and --out checked before any model loads)
    ("cli-td-k", ValueError, r"SweepConfig\.k must be an int >= 1, got 0",
     lambda e: e.cli("td", "--model", "no/such-model", "--k", "0", "--out", str(e.tmp / "o"))),
    ("cli-td-n-per-task-2", ValueError, r"SweepConfig\.k must be <= n_per_task - 2 = 0 .*got 10",
     lambda e: e.cli("td", "--model", "no/such-model", "--n-per-task", "2", "--out", str(e.tmp / "o"))),
    ("cli-td-metric", ValueError, r"metric must be one of .*'manhattan'",
     lambda e: e.cli("td", "--model", "no/such-model", "--metric", "manhattan", "--out", str(e.tmp / "o"))),
    ("cli-td-family", ValueError, r"unknown task family 'nope'",
     lambda e: e.cli("td", "--model", "no/such-model", "--family", "nope", "--out", str(e.tmp / "o"))),
    ("cli-td-shots", ValueError, r"--shots must be comma-separated ints, got '1,x'",
     lambda e: e.cli("td", "--model", "no/such-model", "--shots", "1,x", "--out", str(e.tmp / "o"))),
    ("cli-patch-k", ValueError, r"PatchConfig\.k must be <= n_per_task - 2 = 1 .*got 5",
     lambda e: e.cli("patch", "--model", "no/such-model", "--n-per-task", "3", "--k", "5", "--td", "--out",
                    str(e.tmp / "o"))),
    ("cli-patch-template", ValueError, r"PatchConfig\.template\['prefix'\] must be a string, got 3",
     lambda e: e.cli("patch", "--model", "no/such-model", "--template", '{"prefix": 3}', "--out", str(e.tmp / "o"))),
    ("cli-patch-template-json", ValueError, r"--template must be a JSON object, got '\{prefix'",
     lambda e: e.cli("patch", "--model", "no/such-model", "--template", "{prefix", "--out", str(e.tmp / "o"))),
    ("cli-patch-mode", ValueError, r"PatchConfig\.modes must be a non-empty list of .*got 'both'",
     lambda e: e.cli("patch", "--model", "no/such-model", "--modes", "both", "--out", str(e.tmp / "o"))),
    ("cli-finetune-k", ValueError, r"FinetuneConfig\.k must be <= n_per_task - 2 = 3 .*got 10",
     lambda e: e.cli("finetune", "--model", "no/such-model", "--n-per-task", "5", "--out", str(e.tmp / "o"))),
    ("cli-finetune-layers", ValueError, r"FinetuneConfig\.layers must be .*got '3-1': the range is empty",
     lambda e: e.cli("finetune", "--model", "no/such-model", "--layers", "3-1", "--out", str(e.tmp / "o"))),
    ("cli-analyze-k", ValueError, r"AnalysisConfig\.k must be <= n_per_basis - 2 = 2 .*got 10",
     lambda e: e.cli("synthetic", "analyze", str(e.tmp), "--n-per-basis", "4")),
    ("demo-part", ValueError, r"DemoConfig\.parts must be a non-empty list of .*got 'umap'", lambda e: __import__(
        "taskvec_interp.demo", fromlist=["DemoConfig"]).DemoConfig(parts=("umap",))),
    ("demo-setting", ValueError, r"DemoConfig\.td must be a DemoTDConfig .*unknown keys \['bogus'\]", lambda e: __import__(
        "taskvec_interp.demo", fromlist=["DemoConfig"]).DemoConfig(td={"bogus": 1})),
    ("demo-part-k", ValueError, r"DemoConfig\.td\.k must be <= n_per_task - 2 = 2 .*got 3", lambda e: __import__(
        "taskvec_interp.demo", fromlist=["DemoConfig"]).DemoConfig(quick=True, td={"n_per_task": 4})),
    ("cli-demo-family", ValueError, r"DemoConfig\.families must be a non-empty list of .*got 'sentiment'",
     lambda e: e.cli("demo", "--families", "sentiment", "--out", str(e.tmp / "o"))),
    ("cli-trajectory-none", ValueError, r"give exactly one of --checkpoints",
     lambda e: e.cli("trajectory", "--family", "bitwise", "--out", str(e.tmp / "o"))),
]


@pytest.mark.parametrize(("case", "error", "match", "call"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(case, error, match, call, tmp_path, word_tokenizer, monkeypatch):
    from taskvec_interp.adapters import load as load_mod

    loaded: list = []
    if case.startswith("cli-"):  # the CLI must refuse before it loads any model
        monkeypatch.setattr(load_mod, "load_model", _cli_spy(loaded))
        import taskvec_interp.adapters as adapters_pkg

        monkeypatch.setattr(adapters_pkg, "load_model", _cli_spy(loaded))
    env = Env(tmp_path, word_tokenizer)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=match):
        call(env)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    created = [p for p in after if p not in before and not _fixture_file(p)]
    assert not created, f"{case} left {created} on disk"
    assert not loaded, f"{case}: the model was loaded before the refusal"


def _fixture_file(p: Path) -> bool:
    """Files a case wrote itself as its bad input (a torn checkpoint, an incomplete result)."""
    return p.parts[0] in ("step_0000010", "sweep", "patch", "metrics.jsonl")


def test_suite_size():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_console_script_prints_one_line_not_a_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "taskvec_interp.cli", "td", "--model", "no/such-model", "--k", "0",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("Error: SweepConfig.k must be an int >= 1, got 0")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    json.dumps(res.stderr)  # plain text
