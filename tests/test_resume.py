"""Resume keyed by the whole config and the model's weights; inputs tied into provenance; summaries that refuse to
mix (issue 20, part B).

Every refusal is checked for: the error type, a message naming the differing field with both values (or the
file), nothing written or deleted (the directory tree snapshotted byte for byte before and after), no model work,
and, for resume cases, the finished work (chunks, checkpoints, parts, per-step tables) still there, unchanged.
Tiny random models over SmolLM2's vocabulary only."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import taskvec_interp.adapters.fingerprint as F
from taskvec_interp.adapters import load_model
from taskvec_interp.cli import app
from taskvec_interp.demo import DEMO_KEEP, DemoConfig, Part, part_key, run_demo
from taskvec_interp.demo.config import demo_settings
from taskvec_interp.engine import ArchitectureError, run_checkpoints
from taskvec_interp.experiments.finetune import FinetuneConfig, FinetuneResult, compare_runs, finetune
from taskvec_interp.experiments.patching import PatchConfig, run_patching
from taskvec_interp.experiments.sweep import SweepConfig, SweepResult, run_sweep
from taskvec_interp.experiments.trajectory import (
    TrajectoryConfig,
    language_model_loader,
    local_checkpoints,
    run_trajectory,
)
from taskvec_interp.io import claim_result_dir, config_diffs
from taskvec_interp.probes.vectors import TaskVectors
from taskvec_interp.synthetic.analysis import analyze_seeds
from taskvec_interp.synthetic.train import train, train_config, train_seeds
from taskvec_interp.tasks import PromptTemplate, get_family

PCFG = dict(family="bitwise", n_per_task=3, shots=2, k=1, n_boot=20, layers=[1], modes=("add",),
            directions=("positive", "negative"), batch_size=8)
"""A patching run of 3 conditions (baseline, positive, negative): with chunk_size=1, three chunks."""
FAST = {"n_train": 6, "steps": 6, "batch_size": 4, "lr": 5e-2, "warmup_steps": 2, "ckpt_every": 3,
        "n_per_task": 3, "shots": 2, "k": 1}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included) with its bytes: equal trees, nothing written or deleted."""
    root = Path(root)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class ModelWork:
    """Counts forward calls of an adapter's model: a refusal comes before any."""

    def __init__(self, adapter):
        self.module, self.calls = adapter._hf_module(), 0

    def __enter__(self):
        def count(module, args, kwargs):
            self.calls += 1

        self.handle = self.module.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _tiny(tok, seed: int, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def _save(model, tok, d: Path) -> Path:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(smol_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Model directories: ``a`` and ``b`` (same shape, other weights), ``a3`` (3 layers)."""
    root = tmp_path_factory.mktemp("resume-models")
    return {"a": _save(_tiny(smol_tokenizer, 1), smol_tokenizer, root / "a"),
            "b": _save(_tiny(smol_tokenizer, 2), smol_tokenizer, root / "b"),
            "a3": _save(_tiny(smol_tokenizer, 3, layers=3), smol_tokenizer, root / "a3")}


def _kill_patching(adapter, cfg: PatchConfig, ckpt: Path) -> None:
    """A patching run killed while its third chunk runs: chunks 0 and 1 are finished on disk."""
    real, calls = adapter.generate_branches, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    adapter.generate_branches = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            run_patching(adapter, cfg, checkpoint_dir=ckpt, chunk_size=1, progress=False)
    finally:
        del adapter.generate_branches
    assert sorted(p.name for p in ckpt.glob("chunk_*.parquet")) == ["chunk_000000_1.parquet", "chunk_000001_1.parquet"]


@pytest.fixture(scope="module")
def killed_patch(models, tmp_path_factory) -> Path:
    """Finished chunks of a patching run of model ``a`` at seed 0 (copied by each test that resumes it)."""
    ckpt = tmp_path_factory.mktemp("killed-patch") / "ckpt"
    _kill_patching(load_model(str(models["a"])), PatchConfig(model=str(models["a"]), **PCFG), ckpt)
    return ckpt


def _chunks(killed_patch: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(killed_patch, ckpt)
    return ckpt


def _refused_resume(adapter, cfg: PatchConfig, ckpt: Path, *needles: str) -> str:
    before = tree(ckpt)
    with ModelWork(adapter) as work, pytest.raises(ValueError) as err:
        run_patching(adapter, cfg, checkpoint_dir=ckpt, chunk_size=1, progress=False)
    msg = str(err.value)
    assert str(ckpt) in msg and "another config" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert work.calls == 0, "model work before the refusal"
    assert tree(ckpt) == before  # the finished chunks are there, byte-identical; nothing else written
    return msg


# ------------------------------------------------------------------------------------------------
# the diff helper and the fingerprint
# ------------------------------------------------------------------------------------------------
def test_config_diffs_names_each_field_with_both_values():
    assert config_diffs({"seed": 0, "shots": (1, 4)}, {"seed": 1, "shots": [1, 4]}) == ["seed: saved 0, given 1"]
    fp_a, fp_b = "3f2a" + "0" * 60, "91c0" + "1" * 60
    assert config_diffs({"model fingerprint": fp_a}, {"model fingerprint": fp_b}) == [
        "model fingerprint: saved 3f2a00000000..., given 91c011111111..."]
    assert config_diffs({"model": {"backbone": "gpt2"}}, {"model": {"backbone": "mamba2"}, "x": 1},
                        labels=("seed_0", "seed_1")) == ["model.backbone: seed_0 'gpt2', seed_1 'mamba2'",
                                                         "x: seed_0 (none), seed_1 1"]


def test_fingerprint_follows_the_weights_not_the_path(models, smol_tokenizer, tmp_path):
    a = load_model(str(models["a"]))
    ident = a.identity()
    assert ident["fingerprint_kind"] == "parameters" and len(ident["fingerprint"]) == 64
    copy = shutil.copytree(models["a"], tmp_path / "elsewhere")
    assert load_model(str(copy)).identity()["fingerprint"] == ident["fingerprint"]  # same weights, another path
    from taskvec_interp.adapters import TorchHooksAdapter

    module = _tiny(smol_tokenizer, 1)
    assert TorchHooksAdapter(module, smol_tokenizer).identity()["fingerprint"] == ident["fingerprint"]  # in memory
    shutil.copyfile(models["b"] / "model.safetensors", copy / "model.safetensors")  # other weights, same path
    assert load_model(str(copy)).identity()["fingerprint"] != ident["fingerprint"]


def test_fingerprint_streams_in_chunks_and_names_its_kind(models, smol_tokenizer, monkeypatch, tmp_path):
    module = _tiny(smol_tokenizer, 1)
    whole = F.parameters_fingerprint(module)
    monkeypatch.setattr(F, "CHUNK_BYTES", 100)  # a tensor is copied to the CPU 100 bytes at a time
    assert F.parameters_fingerprint(module) == whole
    copy = shutil.copytree(models["a"], tmp_path / "copy")
    cache = tmp_path / "cache" / "fingerprints.json"
    assert F.files_fingerprint(models["a"], cache) == F.files_fingerprint(copy, cache) is not None
    assert str((copy / "model.safetensors").resolve()) in json.loads(cache.read_text())["files"]  # cached by path
    with torch.device("meta"):  # weights not here (a remote model): fingerprinted from its config, said so
        meta = _tiny(smol_tokenizer, 1)
    got = F.model_fingerprint(meta, name="org/model", revision="main")
    assert got["fingerprint_kind"] == "config" and got == F.model_fingerprint(meta, name="org/model", revision="main")
    assert F.model_fingerprint(meta, name="org/model", revision="step1")["fingerprint"] != got["fingerprint"]


# ------------------------------------------------------------------------------------------------
# patching chunks
# ------------------------------------------------------------------------------------------------
def test_patching_resume_with_another_seed_is_refused(models, killed_patch, tmp_path):
    ckpt = _chunks(killed_patch, tmp_path)
    _refused_resume(load_model(str(models["a"])), PatchConfig(model=str(models["a"]), **{**PCFG, "seed": 1}), ckpt,
                    "seed: saved 0, given 1")


def test_patching_resume_with_another_n_per_task_is_refused(models, killed_patch, tmp_path):
    ckpt = _chunks(killed_patch, tmp_path)
    _refused_resume(load_model(str(models["a"])), PatchConfig(model=str(models["a"]), **{**PCFG, "n_per_task": 4}),
                    ckpt, "n_per_task: saved 3, given 4")


def test_patching_resume_with_another_model_is_refused(models, killed_patch, tmp_path):
    ckpt = _chunks(killed_patch, tmp_path)
    a, b = load_model(str(models["a"])), load_model(str(models["b"]))
    _refused_resume(b, PatchConfig(model=str(models["a"]), **PCFG), ckpt,
                    f"model fingerprint: saved {a.fingerprint()['fingerprint'][:12]}..., given "
                    f"{b.fingerprint()['fingerprint'][:12]}...")


def test_patching_resumes_the_same_weights_at_another_path(models, killed_patch, tmp_path):
    ckpt = _chunks(killed_patch, tmp_path)
    copy = shutil.copytree(models["a"], tmp_path / "moved")
    adapter = load_model(str(copy))
    real, calls = adapter.generate_branches, []
    adapter.generate_branches = lambda *a, **k: calls.append(1) or real(*a, **k)
    resumed = run_patching(adapter, PatchConfig(model=str(copy), **PCFG), checkpoint_dir=ckpt, chunk_size=1,
                           progress=False)
    assert calls == [1]  # only the third chunk ran: the two finished ones were read back
    whole = run_patching(load_model(str(models["a"])), PatchConfig(model=str(models["a"]), **PCFG), progress=False)
    pd.testing.assert_frame_equal(resumed.predictions, whole.predictions)
    assert not ckpt.exists()  # the result is whole: its chunks are removed


def test_patching_other_weights_at_the_same_path_are_refused(models, tmp_path):
    path = shutil.copytree(models["a"], tmp_path / "m")
    ckpt = tmp_path / "ckpt"
    _kill_patching(load_model(str(path)), PatchConfig(model=str(path), **PCFG), ckpt)
    shutil.copyfile(models["b"] / "model.safetensors", path / "model.safetensors")  # retrained in place
    _refused_resume(load_model(str(path)), PatchConfig(model=str(path), **PCFG), ckpt, "model fingerprint: saved ")


def test_patching_chunks_without_their_config_are_refused(models, killed_patch, tmp_path):
    ckpt = _chunks(killed_patch, tmp_path)
    index = json.loads((ckpt / "conditions.json").read_text())
    del index["config"]  # written by an older version
    (ckpt / "conditions.json").write_text(json.dumps(index))
    before = tree(ckpt)
    adapter = load_model(str(models["a"]))
    with ModelWork(adapter) as work, pytest.raises(ValueError, match="saved without their config") as err:
        run_patching(adapter, PatchConfig(model=str(models["a"]), **PCFG), checkpoint_dir=ckpt, chunk_size=1,
                     progress=False)
    assert str(ckpt) in str(err.value) and work.calls == 0 and tree(ckpt) == before


def test_patch_cli_resume_with_another_seed_is_refused(models, killed_patch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(killed_patch, out / ".partial")
    before = tree(out)
    args = ["patch", "--model", str(models["a"]), "--family", "bitwise", "--n-per-task", "3", "--shots", "2",
            "--k", "1", "--n-boot", "20", "--layers", "1", "--modes", "add", "--directions", "positive,negative",
            "--batch-size", "8", "--seed", "1", "--chunk", "1", "--out", str(out), "--no-figures"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and isinstance(result.exception, ValueError), result.output
    assert "seed: saved 0, given 1" in str(result.exception) and str(out / ".partial") in str(result.exception)
    assert tree(out) == before  # the finished chunks, byte-identical; no result written


# ------------------------------------------------------------------------------------------------
# vectors files: provenance checked against the run
# ------------------------------------------------------------------------------------------------
def _vectors_file(path: Path, adapter, *, definition: str = "paper", component: str = "resid_post", shots: int = 2,
                  drop: tuple[str, ...] = ()) -> Path:
    tasks = get_family("bitwise").task_names
    meta = {"model": adapter.identity(), "component": component, "shots": shots,
            "template": asdict(PromptTemplate()), "n": {t: 3 for t in tasks}, "seed": 0, "family": "bitwise"}
    for key in drop:
        meta.pop(key)
    vecs = torch.randn(adapter.n_layers, len(tasks), adapter.d_model, generator=torch.Generator().manual_seed(0))
    return TaskVectors(vecs, list(range(adapter.n_layers)), tasks, definition, meta).save(path)


def _refused_vectors(adapter, path: Path, cfg: PatchConfig, *needles: str, error=ValueError) -> str:
    before = tree(path.parent)
    with ModelWork(adapter) as work, pytest.raises(error) as err:
        run_patching(adapter, cfg, vectors=TaskVectors.load(path, adapter), progress=False)
    msg = str(err.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert work.calls == 0 and tree(path.parent) == before
    return msg


def test_a_hendel_vectors_file_is_not_applied_as_paper(models, tmp_path):
    a = load_model(str(models["a"]))
    path = _vectors_file(tmp_path / "v" / "hendel.safetensors", a, definition="hendel")
    _refused_vectors(a, path, PatchConfig(**PCFG), "definition: vectors 'hendel', run 'paper'")


def test_an_attn_out_vectors_file_is_not_applied_at_resid_post(models, tmp_path):
    a = load_model(str(models["a"]))
    path = _vectors_file(tmp_path / "v" / "attn.safetensors", a, component="attn_out")
    _refused_vectors(a, path, PatchConfig(**PCFG), "component: vectors 'attn_out', run 'resid_post'")


def test_a_one_shot_vectors_file_is_not_applied_as_two_shot(models, tmp_path):
    a = load_model(str(models["a"]))
    path = _vectors_file(tmp_path / "v" / "one.safetensors", a, shots=1)
    _refused_vectors(a, path, PatchConfig(**PCFG), "shots: vectors 1, run 2")


def test_a_vectors_file_of_another_template_is_refused(models, tmp_path):
    a = load_model(str(models["a"]))
    path = _vectors_file(tmp_path / "v" / "t.safetensors", a)
    _refused_vectors(a, path, PatchConfig(**{**PCFG, "template": {"output_prefix": " =>"}}),
                     "template.output_prefix: vectors ' ->', run ' =>'")


def test_a_vectors_file_without_model_metadata_is_refused(models, tmp_path):
    a = load_model(str(models["a"]))
    path = _vectors_file(tmp_path / "v" / "anon.safetensors", a, drop=("model",))
    before = tree(path.parent)
    with pytest.raises(ValueError, match=r"does not record model\.fingerprint \(missing key\)") as err:
        TaskVectors.load(path, a)
    assert str(path) in str(err.value) and tree(path.parent) == before


def test_a_vectors_file_missing_its_settings_is_refused_naming_them(models, tmp_path):
    a = load_model(str(models["a"]))
    path = _vectors_file(tmp_path / "v" / "bare.safetensors", a, drop=("component", "shots", "template"))
    _refused_vectors(a, path, PatchConfig(**PCFG), "component, shots, template (missing keys)")


def test_a_vectors_file_of_other_weights_is_refused_by_fingerprint(models, tmp_path):
    a, b = load_model(str(models["a"])), load_model(str(models["b"]))
    path = _vectors_file(tmp_path / "v" / "b.safetensors", b)
    with pytest.raises(ValueError, match="come from another model") as err:
        TaskVectors.load(path, a)
    assert f"fingerprint: vectors {b.fingerprint()['fingerprint'][:12]}..., this model " \
           f"{a.fingerprint()['fingerprint'][:12]}..." in str(err.value) and str(path) in str(err.value)


def test_a_vectors_file_is_accepted_for_the_same_weights_at_another_path(models, tmp_path):
    path = _vectors_file(tmp_path / "v" / "a.safetensors", load_model(str(models["a"])))
    moved = load_model(str(shutil.copytree(models["a"], tmp_path / "moved")))
    assert TaskVectors.load(path, moved).source == path


# ------------------------------------------------------------------------------------------------
# TD sweeps
# ------------------------------------------------------------------------------------------------
def _sweep(adapter, out: Path, shots=(2,)) -> Path:
    cfg = SweepConfig(family="bitwise", shots=shots, n_per_task=3, k=1, n_boot=10, layers="all")
    return run_sweep(adapter, cfg, progress=False).save(out)


def test_a_td_sweep_of_another_model_is_refused(models, tmp_path):
    a, b = load_model(str(models["a"])), load_model(str(models["b"]))
    sweep = _sweep(b, tmp_path / "td-b")
    before = tree(tmp_path)
    with ModelWork(a) as work, pytest.raises(ValueError, match="comes from another model") as err:
        run_patching(a, PatchConfig(**{**PCFG, "layers": "peak"}), td_sweep=sweep, progress=False)
    assert str(sweep) in str(err.value) and f"model fingerprint: sweep {b.fingerprint()['fingerprint'][:12]}" in \
        str(err.value)
    assert work.calls == 0 and tree(tmp_path) == before


def test_a_td_sweep_without_the_shots_is_refused(models, tmp_path):
    a = load_model(str(models["a"]))
    sweep = _sweep(a, tmp_path / "td")
    with ModelWork(a) as work, pytest.raises(ValueError, match=r"has no 3-shot TD \(it has shots \[2\]\)") as err:
        run_patching(a, PatchConfig(**{**PCFG, "shots": 3, "layers": "peak"}), td_sweep=sweep, progress=False)
    assert str(sweep) in str(err.value) and work.calls == 0


def test_the_td_sweep_and_vectors_file_are_recorded_in_config_json(models, tmp_path):
    a = load_model(str(models["a"]))
    sweep = _sweep(a, tmp_path / "td")
    vectors = _vectors_file(tmp_path / "v.safetensors", a)
    result = run_patching(a, PatchConfig(**{**PCFG, "layers": "peak"}), td_sweep=sweep,
                          vectors=TaskVectors.load(vectors, a), progress=False)
    saved = json.loads((result.save(tmp_path / "patch") / "config.json").read_text())["inputs"]
    manifest = hashlib.sha256((sweep / "manifest.json").read_bytes()).hexdigest()
    assert saved["td_sweep"]["path"] == str(sweep) and saved["td_sweep"]["fingerprint"] == manifest
    assert saved["td_sweep"]["model fingerprint"] == a.fingerprint()["fingerprint"]
    assert saved["vectors"]["file"] == str(vectors) and saved["vectors"]["definition"] == "paper"
    assert saved["vectors"]["file_sha256"] == hashlib.sha256(vectors.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# demo parts
# ------------------------------------------------------------------------------------------------
def _finished_part(out: Path, name: str, key: dict) -> None:
    claim_result_dir(out, "demo", keep=DEMO_KEEP)  # an earlier demo's directory
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "part.json").write_text(json.dumps(asdict(Part(name, name, "finished", seconds=1.0, key=key))))


def _refused_demo(out: Path, config: DemoConfig, *needles: str) -> None:
    before = tree(out)
    with pytest.raises(ValueError) as err:
        run_demo(out, config, progress=False, log=lambda _: None)
    msg = str(err.value)
    assert "another config" in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert tree(out) == before  # the finished part unchanged; no demo_config.json, no report


def test_the_demo_does_not_reuse_a_part_of_another_model(models, tmp_path):
    a, b = load_model(str(models["a"])), load_model(str(models["b"]))
    old = DemoConfig(quick=True, model=str(models["a"]), parts=("td",), families=("bitwise",))
    _finished_part(tmp_path / "demo", "td_bitwise", part_key("td_bitwise", old, lambda: a.fingerprint()["fingerprint"]))
    _refused_demo(tmp_path / "demo", DemoConfig(quick=True, model=str(models["b"]), parts=("td",), families=("bitwise",)),
                  "td_bitwise holds the demo part 'td_bitwise'", f"model fingerprint: saved "
                  f"{a.fingerprint()['fingerprint'][:12]}..., given {b.fingerprint()['fingerprint'][:12]}...")


def test_the_demo_does_not_reuse_a_part_of_another_seed(tmp_path):
    old = DemoConfig(quick=True, parts=("synthetic",))
    _finished_part(tmp_path / "demo", "synthetic", part_key("synthetic", old, lambda: None))
    _refused_demo(tmp_path / "demo", DemoConfig(quick=True, parts=("synthetic",), seed=1), "seed: saved 0, given 1")


def test_the_demo_does_not_reuse_a_quick_part_in_a_full_run(tmp_path):
    old = DemoConfig(quick=True, parts=("synthetic",))
    _finished_part(tmp_path / "demo", "synthetic", part_key("synthetic", old, lambda: None))
    _refused_demo(tmp_path / "demo", DemoConfig(quick=False, parts=("synthetic",)), "quick: saved True, given False",
                  f"synthetic.steps: saved 300, given {demo_settings(False)['synthetic']['steps']}")


def test_the_demo_does_not_reuse_a_part_without_its_key(tmp_path):
    _finished_part(tmp_path / "demo", "synthetic", {})  # written by an older version
    _refused_demo(tmp_path / "demo", DemoConfig(quick=True, parts=("synthetic",)), "seed: saved (none), given 0")


# ------------------------------------------------------------------------------------------------
# fine-tuning runs
# ------------------------------------------------------------------------------------------------
def _killed_finetune(model: Path, out: Path, **kw) -> FinetuneConfig:
    cfg = FinetuneConfig(model=str(model), layers="first:2", **{**FAST, **kw})
    assert finetune(cfg, out, progress=False, evaluate=False, stop_at=3) is None
    assert (out / "checkpoints" / "step_0000003").is_dir()
    return cfg


def _refused_finetune(cfg: FinetuneConfig, out: Path, *needles: str) -> None:
    before = tree(out)
    with pytest.raises(ValueError, match="another config") as err:
        finetune(cfg, out, progress=False, evaluate=False)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert str(out) in str(err.value) and tree(out) == before  # checkpoints and config untouched


def test_two_finetuning_configs_in_one_out_are_refused(models, tmp_path):
    cfg = _killed_finetune(models["a"], tmp_path / "run")
    _refused_finetune(FinetuneConfig(**{**asdict(cfg), "seed": 1}), tmp_path / "run", "seed: saved 0, given 1")


def test_finetuning_other_weights_at_the_same_path_is_refused(models, tmp_path):
    path = shutil.copytree(models["a"], tmp_path / "m")
    cfg = _killed_finetune(path, tmp_path / "run")
    shutil.copyfile(models["b"] / "model.safetensors", path / "model.safetensors")
    _refused_finetune(cfg, tmp_path / "run", "model fingerprint: saved ")


def test_finetuning_resumes_the_same_weights_at_another_path(models, tmp_path):
    _killed_finetune(models["a"], tmp_path / "run")
    kept = tree(tmp_path / "run" / "checkpoints" / "step_0000003")
    moved = shutil.copytree(models["a"], tmp_path / "moved")
    cfg = FinetuneConfig(model=str(moved), layers="first:2", **FAST)
    resumed = finetune(cfg, tmp_path / "run", progress=False, evaluate=False)
    assert tree(tmp_path / "run" / "checkpoints" / "step_0000003") == kept  # resumed from it, not recomputed
    whole = finetune(FinetuneConfig(model=str(models["a"]), layers="first:2", **FAST), tmp_path / "whole",
                     progress=False, evaluate=False)
    assert all(torch.equal(resumed.trained[k], whole.trained[k]) for k in whole.trained)


def test_an_evaluation_without_its_config_is_not_reused(models, tmp_path):
    out = tmp_path / "run"
    claim_result_dir(out, "finetune")
    (out / "eval_pretrained").mkdir()
    (out / "eval_pretrained" / "td.parquet").write_bytes(b"from another run")
    before = tree(out)
    with pytest.raises(ValueError, match="no config.json") as err:
        finetune(FinetuneConfig(model=str(models["a"]), layers="first:2", **FAST), out, progress=False)
    assert str(out) in str(err.value) and tree(out) == before


def _fake_run(path: str, fingerprint: str, layers: str = "first:2") -> FinetuneResult:
    """A finished, evaluated run (tables only: compare_runs reads nothing else)."""
    tasks = ["AND", "OR", "null"]
    td = pd.DataFrame([{"level": "overall", "layer": layer, "td": 0.1 * layer, "task": None} for layer in range(3)]
                      + [{"level": "task", "layer": layer, "td": 0.2, "task": t} for layer in range(3) for t in tasks])
    acc = pd.DataFrame({"task": tasks, "exact": [0.5, 0.25, 1.0]})
    sweep = SweepResult(SweepConfig(shots=(2,), n_per_task=3, k=1), td, acc, pd.DataFrame(), {})
    cfg = FinetuneConfig(model="tiny", layers=layers, **FAST)
    return FinetuneResult(cfg, [0, 1], {}, pd.DataFrame(), sweep, sweep, {"fingerprint": fingerprint}, Path(path))


def test_finetune_compare_keeps_two_runs_of_one_layer_spec(tmp_path):
    summary, per_task, _ = compare_runs([_fake_run(str(tmp_path / "r1"), "f" * 64),
                                         _fake_run(str(tmp_path / "r2"), "f" * 64)])
    assert summary["model"].tolist() == ["pretrained", "lora first:2", "lora first:2 (r2)"]
    assert set(per_task["model"]) == {"pretrained", "lora first:2", "lora first:2 (r2)"}


def test_finetune_compare_refuses_runs_of_two_base_models(tmp_path):
    with pytest.raises(ValueError, match="different base models") as err:
        compare_runs([_fake_run(str(tmp_path / "r1"), "a" * 64), _fake_run(str(tmp_path / "r2"), "b" * 64)])
    assert f"model fingerprint: {tmp_path / 'r1'} {'a' * 12}..., {tmp_path / 'r2'} {'b' * 12}..." in str(err.value)


def test_finetune_compare_refuses_one_run_given_twice(tmp_path):
    run = _fake_run(str(tmp_path / "r1"), "a" * 64)
    with pytest.raises(ValueError, match="is given twice") as err:
        compare_runs([run, _fake_run(str(tmp_path / "r1"), "a" * 64)])
    assert str(tmp_path / "r1") in str(err.value)


# ------------------------------------------------------------------------------------------------
# synthetic runs and seeds
# ------------------------------------------------------------------------------------------------
def _seed_dir(root: Path, seed: int, **overrides) -> None:
    (root / f"seed_{seed}").mkdir(parents=True)
    cfg = train_config("tiny", seed=seed, **overrides)
    (root / f"seed_{seed}" / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))


def test_a_solo_synthetic_run_into_a_seeds_directory_is_refused(tmp_path):
    _seed_dir(tmp_path / "seeds", 0, steps=20)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="holds the runs of several seeds") as err:
        train(train_config("tiny", steps=2), tmp_path / "seeds", progress=False)
    assert "seed_0" in str(err.value) and str(tmp_path / "seeds") in str(err.value) and tree(tmp_path) == before


def test_seeds_into_a_solo_synthetic_run_are_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(train_config("tiny", steps=20).to_dict()))
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="holds a solo run") as err:
        train_seeds(train_config("tiny", steps=2), [0, 1], run, progress=False)
    assert str(run) in str(err.value) and tree(tmp_path) == before


def test_seeds_of_two_backbones_are_not_analysed_together(tmp_path):
    _seed_dir(tmp_path / "seeds", 0, steps=20)
    _seed_dir(tmp_path / "seeds", 1, steps=20, backbone="mamba2")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="not trained with one config") as err:
        analyze_seeds(tmp_path / "seeds", umap=False, progress=False)
    assert "model.backbone: seed_0 'gpt2', seed_1 'mamba2'" in str(err.value) and tree(tmp_path) == before


def test_seeds_of_20_and_30_steps_are_not_analysed_together(tmp_path):
    _seed_dir(tmp_path / "seeds", 0, steps=20)
    _seed_dir(tmp_path / "seeds", 1, steps=30)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="steps: seed_0 20, seed_1 30"):
        analyze_seeds(tmp_path / "seeds", umap=False, progress=False, out=tmp_path / "analysis")
    assert tree(tmp_path) == before and not (tmp_path / "analysis").exists()


# ------------------------------------------------------------------------------------------------
# trajectories
# ------------------------------------------------------------------------------------------------
def _norms(calls: list, kill_at: int | None = None):
    def probe(adapter, entry):
        if entry.index == kill_at:
            raise KeyboardInterrupt
        calls.append(entry.index)
        with torch.no_grad():
            norm = float(sum(p.float().norm() for p in adapter._hf_module().parameters()))
        return {"norms": pd.DataFrame({"param_norm": [norm]})}

    return probe


def _killed_trajectory(dirs: list[Path], out: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_checkpoints(local_checkpoints(dirs, steps=[0, 1]), _norms([], kill_at=1), language_model_loader(), out=out,
                        config={"x": 1}, progress=False)
    assert [p.name for p in (out / "per_step").iterdir()] == ["step_0000000"]


def test_a_trajectory_resumed_with_another_config_is_refused(models, tmp_path):
    out = tmp_path / "traj"
    _killed_trajectory([models["a"], models["b"]], out)
    before, calls = tree(out), []
    with pytest.raises(ValueError, match="another probe configuration") as err:
        run_checkpoints(local_checkpoints([models["a"], models["b"]], steps=[0, 1]), _norms(calls),
                        language_model_loader(), out=out, config={"x": 2}, progress=False)
    assert "x: saved 1, given 2" in str(err.value) and str(out / "per_step" / "step_0000000") in str(err.value)
    assert calls == [] and tree(out) == before


def test_a_trajectory_step_of_other_weights_at_the_same_path_is_refused(models, tmp_path):
    path = shutil.copytree(models["a"], tmp_path / "ckpt-0")
    out = tmp_path / "traj"
    _killed_trajectory([path, models["b"]], out)
    shutil.copyfile(models["b"] / "model.safetensors", path / "model.safetensors")
    before, calls = tree(out), []
    with pytest.raises(ValueError, match="computed from other weights") as err:
        run_checkpoints(local_checkpoints([path, models["b"]], steps=[0, 1]), _norms(calls), language_model_loader(),
                        out=out, config={"x": 1}, progress=False)
    assert "weights: saved " in str(err.value) and str(path) in str(err.value)
    assert calls == [] and tree(out) == before


def test_a_trajectory_resumes_the_same_weights_at_another_path(models, tmp_path):
    out = tmp_path / "traj"
    _killed_trajectory([models["a"], models["b"]], out)
    moved = shutil.copytree(models["a"], tmp_path / "moved")
    kept, calls = tree(out / "per_step" / "step_0000000"), []
    run = run_checkpoints(local_checkpoints([moved, models["b"]], steps=[0, 1]), _norms(calls),
                          language_model_loader(), out=out, config={"x": 1}, progress=False)
    assert calls == [1] and run.ran == [1]  # step 0 read back
    assert tree(out / "per_step" / "step_0000000") == kept


def test_a_trajectory_of_different_architectures_is_refused_before_any_load(models, tmp_path):
    loads = []

    def load(entry):
        loads.append(entry.index)
        raise AssertionError("a model loaded before the check")

    with pytest.raises(ArchitectureError, match="n_layers: checkpoint 0 4, checkpoint 1 3") as err:
        run_trajectory(local_checkpoints([models["a"], models["a3"]], steps=[0, 1]),
                       TrajectoryConfig(family="bitwise", shots=2, n_per_task=3, k=1, n_boot=0), out=tmp_path / "t",
                       load=load, progress=False)
    assert str(models["a3"]) in str(err.value) and loads == [] and not (tmp_path / "t").exists()


def test_architectures_loaded_later_are_compared_and_finished_steps_kept(models, tmp_path):
    out, calls = tmp_path / "traj", []
    entries = local_checkpoints([models["a"], models["a3"]], steps=[0, 1])
    with pytest.raises(ArchitectureError, match="n_layers: checkpoint 0 4, checkpoint 1 3"):
        run_checkpoints(entries, _norms(calls), language_model_loader(), out=out, config={"x": 1}, progress=False,
                        same_architecture=True)
    assert calls == [0] and [p.name for p in (out / "per_step").iterdir()] == ["step_0000000"]
    mixed = run_checkpoints(entries, _norms(calls), language_model_loader(), out=out, config={"x": 1},
                            progress=False, same_architecture=False)  # allow_mixed_architectures=True
    assert calls == [0, 1] and mixed.ran == [1]


def test_allow_mixed_architectures_is_a_config_field_and_a_cli_option():
    assert TrajectoryConfig(allow_mixed_architectures=True).allow_mixed_architectures is True
    with pytest.raises(ValueError, match="TrajectoryConfig.allow_mixed_architectures"):
        TrajectoryConfig(allow_mixed_architectures="yes")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["trajectory", "--help"])
    assert "--allow-mixed-architectures" in result.output
