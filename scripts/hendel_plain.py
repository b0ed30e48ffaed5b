"""Hendel et al.'s zero-shot task-vector protocol written PLAINLY (transformers + torch forward hooks, a hand-written
greedy loop), beside the library's preset (``taskvec zeroshot`` / ``run_zero_shot``) on the same queries.

    .venv/bin/python scripts/hendel_plain.py                         # 6 fv tasks, 10 dev / 25 test queries each
    .venv/bin/python scripts/hendel_plain.py --tasks antonym,capitalize --n-dev 5 --n-test 10 --layers 14-22
    .venv/bin/python scripts/hendel_plain.py --no-library            # the plain protocol alone

The library is imported ONLY to build the prompts (``zero_shot_prompts``: the same queries, demonstrations, dummy
queries and template as the preset) and to find the cached SmolLM2 directory; everything the protocol computes
(the vectors, the patched greedy generation, the scoring, the layer choice) is written here with plain torch:

* vector of a query at layer L: forward hooks on ``model.model.layers[L]`` read the block's output at the last
  token of each dummy prompt (its demonstrations + a dummy query; left padding, so the last column), averaged over
  the query's dummies; the per-task vector is the mean over the task's dev queries;
* patched run: the zero-shot prompt ``x ->`` runs once with a hook on ``layers[L]`` that overwrites the output at
  the last prompt position (prefill only), then greedy decoding continues from the KV cache without hooks;
* scoring: first generated content token vs the answer's first content token (token texts, whitespace-only
  tokens skipped) and exact match of the generation cut at its first line break.

Writes ``OUT/plain.parquet`` (and ``OUT/library`` + ``OUT/comparison.json`` with ``--library``) and prints the
per-task table, the chosen layers and the paired plain-vs-library comparison (McNemar on the same queries).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = "past_key_values"
"""The cache keyword of the model's forward (transformers 5 renamed it ``cache``; set in ``main``)."""
TASKS = "antonym,capitalize,country-capital,english-french,present-past,singular-plural"


# ------------------------------------------------------------------------------------------------
# plain torch: padding, capture with forward hooks, greedy decoding with one patched prefill
# ------------------------------------------------------------------------------------------------
def left_pad(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tok(t)["input_ids"] for t in texts]
    n = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(ids), n), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for r, x in enumerate(ids):  # ragged rows into a left-padded tensor
        input_ids[r, n - len(x):] = torch.tensor(x)
        mask[r, n - len(x):] = 1
    return input_ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def last_token_states(model, tok, texts: list[str], layers: list[int], batch: int) -> torch.Tensor:
    """``[layer, text, d]``: each block's output at the last token, read by forward hooks."""
    blocks = model.model.layers
    out = []
    for s in range(0, len(texts), batch):
        ids, mask = left_pad(tok, texts[s:s + batch])
        got: dict[int, torch.Tensor] = {}
        handles = [blocks[layer].register_forward_hook(
            lambda m, a, o, layer=layer, got=got: got.__setitem__(layer, (o[0] if isinstance(o, tuple) else o)[:, -1].float()))
            for layer in layers]
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        out.append(torch.stack([got[layer] for layer in layers]))
    return torch.cat(out, 1)


@torch.no_grad()
def greedy(model, tok, texts: list[str], n_new: int, patches: list[tuple[int, torch.Tensor]] | None = None,
           batch: int = 64) -> list[list[int]]:
    """Greedy new token ids per text (cut at EOS). ``patches``: per text, ``(layer, vector)``: the output of
    ``model.model.layers[layer]`` at the text's last prompt position is replaced by ``vector`` in the prefill only
    (one forward hook per layer, each writing the rows patched at its layer); ``None``: no patch."""
    res: list[list[int]] = []
    for s in range(0, len(texts), batch):
        ids, mask = left_pad(tok, texts[s:s + batch])
        handles = []
        if patches is not None:
            chunk = patches[s:s + batch]
            for layer in sorted({layer for layer, _ in chunk}):
                rows = torch.tensor([r for r, (at, _) in enumerate(chunk) if at == layer])
                vec = torch.stack([v for at, v in chunk if at == layer])

                def patch(m, a, o, rows=rows, vec=vec):
                    h = (o[0] if isinstance(o, tuple) else o).clone()
                    h[rows, -1] = vec.to(h.dtype)
                    return (h, *o[1:]) if isinstance(o, tuple) else h

                handles.append(model.model.layers[layer].register_forward_hook(patch))
        try:
            pos = positions(mask)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        new = [out.logits[:, -1].argmax(-1)]
        past = getattr(out, "cache", None) or out.past_key_values
        for _ in range(n_new - 1):  # decoding: no hooks, the patched position lives on in the cache
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=new[-1][:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                        **{CACHE: past})
            past = getattr(out, "cache", None) or out.past_key_values
            new.append(out.logits[:, -1].argmax(-1))
        rows = torch.stack(new, 1).tolist()
        for row in rows:
            res.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
    return res


# ------------------------------------------------------------------------------------------------
# plain scoring
# ------------------------------------------------------------------------------------------------
def first_content(tok, ids: list[int]) -> str | None:
    """The stripped text of the first token that is not spaces only; ``None`` if a line break comes first."""
    for j in range(len(ids)):
        text = tok.decode(ids[: j + 1])
        if "\n" in text and not text.split("\n")[0].strip():
            return None
        if text.strip() and "\ufffd" not in text:
            return text.strip()
    return None


def answer_ids(tok, prompt: str, answer: str) -> list[int]:
    p = tok(prompt)["input_ids"]
    f = tok(prompt + answer)["input_ids"]
    return f[len(p):] if f[: len(p)] == p else tok(answer)["input_ids"]


def need(tok, prompt) -> int:
    """Tokens a generator needs to emit the answer: joint tokenization minus the prompt's, or the answer alone."""
    p, f = tok(prompt.text)["input_ids"], tok(prompt.text + prompt.answer)["input_ids"]
    return max(len(f) - len(p), len(answer_ids(tok, prompt.text, prompt.answer)), len(tok(prompt.answer)["input_ids"]))


def exact(text: str, target: str) -> bool:
    return " ".join(text.split("\n")[0].split()) == " ".join(target.split())


# ------------------------------------------------------------------------------------------------
def run_plain(model, tok, zp, layers: list[int], n_dummy: int, batch: int, log) -> pd.DataFrame:
    t0 = time.perf_counter()
    n = len(zp.icl)
    states = last_token_states(model, tok, [p.text for p in zp.dummies], layers, batch)  # [L, n * n_dummy, d]
    per_query = states.view(len(layers), n, n_dummy, -1).mean(2)
    tasks = [p.task for p in zp.icl]
    per_task = per_query.clone()
    for t in zp.tasks:
        rows = [i for i in range(n) if tasks[i] == t]
        dev = [i for i in rows if zp.split[i] == "dev"]
        per_task[:, rows] = per_query[:, dev].mean(1, keepdim=True)
    log(f"plain: vectors read ({time.perf_counter() - t0:.0f}s)")
    firsts = [first_content(tok, answer_ids(tok, p.text, p.answer)) for p in zp.zero]
    budget = {t: max(need(tok, p) for i in range(n) if tasks[i] == t for p in (zp.zero[i], zp.icl[i]))
              for t in zp.tasks}
    frames = []

    def record(rows, gens, cond, vector, layer, prompts):
        texts = [tok.decode(g, skip_special_tokens=True) for g in gens]
        frames.append(pd.DataFrame({
            "task": [tasks[i] for i in rows], "split": [zp.split[i] for i in rows], "layer": layer, "condition": cond,
            "vector": vector, "query": rows, "input": [prompts[i].query for i in rows],
            "answer": [prompts[i].target for i in rows], "generated": texts,
            "exact": [exact(x, prompts[i].target) for x, i in zip(texts, rows, strict=True)],
            "first_token": [firsts[i] is not None and first_content(tok, g) == firsts[i]
                            for g, i in zip(gens, rows, strict=True)]}))

    for t in zp.tasks:
        rows = [i for i in range(n) if tasks[i] == t]
        zero = [zp.zero[i].text for i in rows]
        record(rows, greedy(model, tok, zero, budget[t], batch=batch), "baseline", "", -1, zp.zero)
        for vector, vecs in (("per_query", per_query), ("per_task", per_task)):  # every layer in one batched call
            patches = [(layer, vecs[li, i]) for li, layer in enumerate(layers) for i in rows]
            gens = greedy(model, tok, zero * len(layers), budget[t], patches, batch=batch)
            for li, layer in enumerate(layers):
                record(rows, gens[li * len(rows):(li + 1) * len(rows)], "task_vector", vector, layer, zp.zero)
        record(rows, greedy(model, tok, [zp.icl[i].text for i in rows], budget[t], batch=batch), "icl", "", -1, zp.icl)
        log(f"plain: task {t} done ({time.perf_counter() - t0:.0f}s)")
    return pd.concat(frames, ignore_index=True)


def choose(preds: pd.DataFrame, metric: str, vector: str) -> int:
    dev = preds[(preds["split"] == "dev") & (preds["condition"] == "task_vector") & (preds["vector"] == vector)]
    curve = dev.groupby(["task", "layer"])[metric].mean().groupby("layer").mean().sort_index()
    return int(curve.idxmax())


def summary_table(preds: pd.DataFrame, metric: str, chosen: dict[str, int]) -> pd.DataFrame:
    test = preds[preds["split"] == "test"]
    rows = []
    for task in ["all", *dict.fromkeys(test["task"])]:
        part = test if task == "all" else test[test["task"] == task]
        row = {"task": task, "n": int(part["query"].nunique()),
               "baseline": part.loc[part.condition == "baseline", metric].mean()}
        for v, layer in chosen.items():
            row[v] = part.loc[(part.condition == "task_vector") & (part.vector == v) & (part.layer == layer), metric].mean()
        row["icl"] = part.loc[part.condition == "icl", metric].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--n-dev", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=25)
    ap.add_argument("--template", type=json.loads, default={}, help="PromptTemplate fields as JSON")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--n-dummy", type=int, default=2)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metric", default="first_token", choices=["first_token", "exact"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the library's preset on the same queries and compare")
    ap.add_argument("--library-dir", type=Path, default=None,
                    help="compare with this saved `taskvec zeroshot` result (same settings) instead of running it")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "hendel_plain")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskvec_interp.adapters import smollm2_dir
    from taskvec_interp.experiments.zeroshot import ZeroShotConfig, zero_shot_prompts
    from taskvec_interp.hooks import resolve_layers
    from taskvec_interp.probes.stats import mcnemar_exact

    def log(msg: str) -> None:
        print(msg, flush=True)

    cfg = ZeroShotConfig(family_kwargs={"tasks": args.tasks.split(",")}, template=args.template, shots=args.shots, n_dev=args.n_dev,
                         n_test=args.n_test, n_dummy=args.n_dummy, layers=args.layers, seed=args.seed,
                         scoring=args.metric, batch_size=args.batch)
    zp = zero_shot_prompts(cfg.build_family(), cfg)  # the library builds the prompts only
    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    global CACHE
    CACHE = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    layers = resolve_layers(args.layers, model.config.num_hidden_layers)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plain = run_plain(model, tok, zp, layers, args.n_dummy, args.batch, log)
    plain_s = time.perf_counter() - t0
    plain.to_parquet(args.out / "plain.parquet", index=False)
    chosen = {v: choose(plain, args.metric, v) for v in ("per_query", "per_task")}
    log(f"plain protocol ({plain_s:.0f}s), layers chosen on dev: {chosen}")
    log(summary_table(plain, args.metric, chosen).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    report: dict = {"config": {**vars(args), "out": str(args.out)}, "plain_seconds": round(plain_s, 1),
                    "plain_chosen_layer": chosen,
                    "plain_table": summary_table(plain, args.metric, chosen).to_dict("records")}
    if args.library or args.library_dir is not None:
        from taskvec_interp.experiments.zeroshot import ZeroShotResult, run_zero_shot

        if args.library_dir is not None:
            for _ in range(720):  # the library's run may still be going (run beside this one): wait up to an hour
                if (args.library_dir / "manifest.json").exists():
                    break
                time.sleep(5)
            lib = ZeroShotResult.load(args.library_dir)
            diffs = {k: (getattr(lib.config, k), getattr(cfg, k)) for k in ("family", "family_kwargs", "template",
                     "shots", "n_dev", "n_test", "n_dummy", "seed", "replace", "scoring")
                     if getattr(lib.config, k) != getattr(cfg, k)}
            if diffs:
                raise SystemExit(f"--library-dir {args.library_dir} was run with other settings: {diffs}")
            lib_s = lib.seconds
        else:
            from taskvec_interp import load_model

            del model
            adapter = load_model("smollm2-135m")
            t0 = time.perf_counter()
            lib = run_zero_shot(adapter, cfg, progress=False)
            lib_s = time.perf_counter() - t0
            lib.save(args.out / "library") if not (args.out / "library").exists() else None
        log(f"library preset ({lib_s:.0f}s), layers chosen on dev: {lib.chosen_layer}")
        table = lib.table()
        log(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        keys = ["condition", "vector", "layer", "query"]
        both = plain.merge(lib.predictions, on=keys, suffixes=("_plain", "_lib"))
        assert len(both) == len(plain) == len(lib.predictions), (len(both), len(plain), len(lib.predictions))
        assert (both["input_plain"] == both["input_lib"]).all()
        same_text = float((both["generated_plain"] == both["generated_lib"]).mean())
        comp: dict = {"library_seconds": round(lib_s, 1), "library_chosen_layer": lib.chosen_layer,
                      "generated_identical_fraction": same_text,
                      "rows": len(both), "metric_agreement": {}}
        for m in ("first_token", "exact"):
            comp["metric_agreement"][m] = float((both[f"{m}_plain"] == both[f"{m}_lib"]).mean())
        for v in ("per_query", "per_task"):
            layer = lib.chosen_layer[v]
            sel = (both.condition == "task_vector") & (both.vector == v) & (both.layer == layer) & (both.split_lib == "test")
            part = both[sel]
            m = mcnemar_exact(part[f"{args.metric}_plain"].to_numpy(), part[f"{args.metric}_lib"].to_numpy())
            t = {"a_only": m.b, "b_only": m.c, "p": m.p_value}
            comp[f"{v}_test_at_layer_{layer}"] = {
                "plain": float(part[f"{args.metric}_plain"].mean()), "library": float(part[f"{args.metric}_lib"].mean()),
                "n": len(part), "plain_only": t["a_only"], "library_only": t["b_only"], "mcnemar_p": t["p"]}
        for c in ("baseline", "icl"):
            part = both[(both.condition == c) & (both.split_lib == "test")]
            m = mcnemar_exact(part[f"{args.metric}_plain"].to_numpy(), part[f"{args.metric}_lib"].to_numpy())
            t = {"a_only": m.b, "b_only": m.c, "p": m.p_value}
            comp[f"{c}_test"] = {"plain": float(part[f"{args.metric}_plain"].mean()),
                                 "library": float(part[f"{args.metric}_lib"].mean()), "plain_only": t["a_only"],
                                 "library_only": t["b_only"], "mcnemar_p": t["p"]}
        row = table[table.task == "all"].iloc[0]
        comp["library_gain"] = {v: {"tv": float(row[v]), "baseline": float(row["baseline"]),
                                    "gain": float(row[f"{v}_gain"]), "mcnemar_p": float(row[f"p_{v}"])}
                                for v in ("per_query", "per_task")}
        comp["p_per_query_vs_per_task"] = float(row["p_per_query_vs_per_task"])
        report["comparison"] = comp
        log(json.dumps(comp, indent=1))
    (args.out / "comparison.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
