"""Scoring of generations (``probes/accuracy.py``): where a generated answer ends (its line's end or the
separator), first-token accuracy by first content tokens of the tokenizer (never string prefixes), and each
task's own answer budget."""

from __future__ import annotations

import json

import pytest
import torch

from taskvec_interp import tasks as T
from taskvec_interp.adapters.base import Generation
from taskvec_interp.probes.accuracy import (
    budget_groups,
    cut_generation,
    exact_match,
    first_token_match,
    generate_by_budget,
    generated_first_content,
    icl_accuracy,
    normalize_answer,
    score_generation,
)


def _prompt(query: str, target: str, separator: str = "\n") -> T.Prompt:
    builder = T.PromptBuilder(T.PromptTemplate(example_separator=separator))
    return builder.render(T.Example(query, target), [T.Example("y", "pear")], task="t", label=0, family="toy")


def _gen(tok, texts: list[str]) -> Generation:
    return Generation(texts=texts, tokens=[tok(t, add_special_tokens=False)["input_ids"] for t in texts])


def _score(tok, prompts, texts, stop):
    checks = T.check_tokenization(tok, prompts)
    return score_generation(prompts, _gen(tok, texts), checks, stop, tokenizer=tok)


# --------------------------------------------------------------------------------------------------
# where a generated answer ends
# --------------------------------------------------------------------------------------------------
def test_an_answer_ends_at_its_line_end_or_the_separator():
    # a blank-line separator: the answer still ends at its line's end (the bug: "changed\nA" scored 0)
    assert cut_generation("changed\nA: next", "\n\n") == "changed"
    assert exact_match("changed\nA", " changed", "\n\n")
    assert exact_match(" changed\n\nQ: x", " changed", "\n\n")
    # a separator on the same line cuts first; a space-only separator never cuts
    assert cut_generation(" a; b\nc", "; ") == " a"
    assert normalize_answer(" New  York\nx", " ") == "New York"
    assert normalize_answer(" down\nright ->") == "down"
    # no separator at all: still the line's end
    assert exact_match(" changed\nmore", " changed", None)
    assert not exact_match(" changed more", " changed", "\n\n")  # more text on the same line is wrong
    assert not exact_match("\nchanged", " changed", "\n\n")  # the answer's line is empty
    # an answer that spans lines (a files: family with a line break in an output) keeps as many lines
    assert exact_match("a\nb\nc", "a\nb", "\n\n")
    assert not exact_match("a\nx\nc", "a\nb", "\n\n")
    # ... and a separator that occurs inside the answer does not cut it
    assert exact_match(" a; b\nmore", " a; b", "; ")


def test_blank_line_separator_scores_a_line_break_then_more_text_right(smol_tokenizer):
    tok = smol_tokenizer
    p = _prompt("x", "changed", "\n\n")
    assert p.text.endswith("pear\n\nx ->") and p.answer == " changed"
    frame = _score(tok, [p] * 4, [" changed\nA", " changed\n\nQ", " changed A", "\n changed"], "\n\n")
    assert frame["exact"].tolist() == [True, True, False, False]
    assert frame["first_token"].tolist() == [True, True, True, False]  # "\n" first: past the answer's line


# --------------------------------------------------------------------------------------------------
# first-token accuracy: first content tokens, not string prefixes
# --------------------------------------------------------------------------------------------------
def test_first_token_compares_tokens_not_prefixes(smol_tokenizer):
    """SmolLM2 has " larva", " larvae", " close" and " closed" as one token each: a longer word is another
    token, so it is wrong (a string-prefix test counted it right)."""
    tok = smol_tokenizer
    for target, other in (("larva", "larvae"), ("close", "closed")):
        p = _prompt("x", target)
        (check,) = T.check_tokenization(tok, [p])
        assert len(check.answer_ids) == 1 and check.first_content == target
        frame = _score(tok, [p] * 4, [f" {other}", f" {target}", f" {target}\nmore", f" {target} and more"], "\n")
        assert frame["first_token"].tolist() == [False, True, True, True], target
        assert frame["exact"].tolist() == [False, True, True, False], target
        ids = tok(f" {other}", add_special_tokens=False)["input_ids"]
        assert generated_first_content(tok, ids) == other
        assert not first_token_match(tok, ids, check.first_content)


@pytest.fixture(scope="module")
def space_tokenizer(tmp_path_factory):
    """A word-level tokenizer whose spaces and newlines are tokens of their own (' cat' -> ' ', 'cat')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = [" ", "\n", "->", "cat", "dog", "apples", "pear", "x", "y", "z", "<unk>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|[^\s]+"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    d = tmp_path_factory.mktemp("space_tok")
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def test_first_token_skips_a_split_off_space(space_tokenizer):
    tok = space_tokenizer
    p = _prompt("x", "apples")
    assert p.text.endswith(" ->") and p.answer == " apples"
    (check,) = T.check_tokenization(tok, [p])
    assert check.ok and [tok.decode([i]) for i in check.answer_ids] == [" ", "apples"]
    assert check.first_content == "apples"
    gens = [" dog\n", " apples\n", "apples", "  apples", "\napples", " ", ""]
    frame = score_generation([p] * len(gens), _gen(tok, gens), [check] * len(gens), tokenizer=tok)
    assert frame["first_token"].tolist() == [False, True, True, True, False, False, False]
    assert frame["exact"].tolist() == [False, True, True, True, False, False, False]
    # comparing first token ids would score the space: ' dog' counted as right
    old = [_gen(tok, [g]).tokens[0][:1] == list(check.answer_ids[:1]) for g in gens]
    assert old[0] and not frame.loc[0, "first_token"]


def test_first_token_on_smollm2_bitwise_scores_the_first_digit(smol_tokenizer):
    tok = smol_tokenizer
    prompts = T.build_prompts(T.get_family("bitwise"), n_per_task=3, shots=2, seed=0)
    checks = T.check_tokenization(tok, prompts, strict=True)
    for p, c in zip(prompts, checks, strict=True):
        assert tok.decode([c.answer_ids[0]]) == " "  # SmolLM2 splits the space off
        assert c.first_content == p.target[0]
    flipped = [" " + ("1" if p.target[0] == "0" else "0") + p.target[1:] + "\n" for p in prompts]
    frame = score_generation(prompts, _gen(tok, flipped), checks, tokenizer=tok)
    assert not frame["first_token"].any() and not frame["exact"].any()
    old = [tok(g, add_special_tokens=False)["input_ids"][0] == c.answer_ids[0] for g, c in
           zip(flipped, checks, strict=True)]
    assert all(old)  # comparing the first token ids gives 1.000 on these wrong answers
    right = [p.answer + "\n" for p in prompts]
    frame = score_generation(prompts, _gen(tok, right), checks, tokenizer=tok)
    assert frame["first_token"].all() and frame["exact"].all()
    # first digit right, the rest wrong: first-token yes, exact no
    half = [" " + p.target[0] + ("1" if p.target[1] == "0" else "0") + p.target[2:] for p in prompts]
    frame = score_generation(prompts, _gen(tok, half), checks, tokenizer=tok)
    assert frame["first_token"].all() and not frame["exact"].any()
    with pytest.raises(ValueError, match="tokenizer"):
        score_generation(prompts, _gen(tok, half), checks, tokenizer=None)


def test_first_token_on_smollm2_pos_answers(smol_tokenizer):
    tok = smol_tokenizer
    fam = T.pos_family(T.UD_EXCERPT)
    prompts = T.build_prompts(fam, n_per_task=2, shots=1, seed=0, tasks=["NOUN", "VERB"])
    checks = T.check_tokenization(tok, prompts)
    for p, c in zip(prompts, checks, strict=True):
        assert p.target.startswith(c.first_content) and c.first_content
        assert first_token_match(tok, list(c.answer_ids), c.first_content)  # the answer's own tokens
        assert first_token_match(tok, list(c.answer_ids) + tok(" and more", add_special_tokens=False)["input_ids"],
                                 c.first_content)
        assert not first_token_match(tok, tok(" \u00a7" + p.target, add_special_tokens=False)["input_ids"],
                                     c.first_content)


def test_icl_accuracy_first_token_when_the_model_emits_space_then_a_wrong_digit(tiny_smol):
    """End to end on SmolLM2's tokenizer: force ' ' then the wrong first digit; comparing the first token
    ids would give first_token True (the forced space is the answer's first token), it is False."""
    prompts = T.build_prompts(T.get_family("bitwise"), n_per_task=1, shots=1, seed=3)[:1]
    tok = tiny_smol.tokenizer
    answer_ids = T.check_tokenization(tok, prompts)[0].answer_ids
    wrong = "1" if prompts[0].target[0] == "0" else "0"
    forced = [answer_ids[0], *tok(wrong, add_special_tokens=False)["input_ids"], *answer_ids[2:]]
    emb = tiny_smol.model.get_input_embeddings().weight
    step = {"i": 0}

    def force(act, ctx):
        out = act.clone()
        out[:, -1] = 100 * emb[forced[min(step["i"], len(forced) - 1)]]
        step["i"] += 1
        return out

    res = icl_accuracy(tiny_smol, prompts, hooks=[("blocks.3.hook_resid_post", force)], progress=False)
    row = res.predictions.loc[0]
    assert row["generated"].startswith(" " + wrong), row["generated"]
    assert not row["first_token"] and not row["exact"]


# --------------------------------------------------------------------------------------------------
# each task its own answer budget
# --------------------------------------------------------------------------------------------------
SHORT = ["cat", "dog", "red", "blue", "sun", "tree"]  # one SmolLM2 token each (with the space)


@pytest.fixture(scope="module")
def mixed_family(tmp_path_factory):
    """A files family with a 1-token task ("short") and a 5-token task ("long")."""
    d = tmp_path_factory.mktemp("mixed")
    (d / "short.json").write_text(json.dumps([{"input": f"s{i}", "output": w} for i, w in enumerate(SHORT)]))
    (d / "long.json").write_text(json.dumps([{"input": f"l{i}", "output": "one two three four five"}
                                             for i in range(6)]))
    return T.files_family(d, tasks=["short", "long"])


def _greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def test_each_task_generates_its_own_answer_budget(tiny_smol, mixed_family):
    tok = tiny_smol.tokenizer
    prompts = [p for p in T.build_prompts(mixed_family, n_per_task=3, shots=1, seed=0) if p.task != "null"]
    checks = T.check_tokenization(tok, prompts, strict=True)
    assert {p.task: c.n_budget for p, c in zip(prompts, checks, strict=True)} == {"short": 1, "long": 5}
    res = icl_accuracy(tiny_smol, prompts, capture_layers="all", batch_size=4, progress=False)
    assert res.budgets == {"short": 1, "long": 5} and res.max_new_tokens == 5
    eos = tok.eos_token_id
    for i, p in enumerate(prompts):  # exactly the greedy answer under the task's own budget
        new = _greedy(tiny_smol.model, tiny_smol.encode([p.text])[0], res.budgets[p.task])
        new = new[: new.index(eos)] if eos in new else new
        assert res.predictions.loc[i, "generated"] == tok.decode(new, skip_special_tokens=True), (p.task, i)
    # the activations of the prefill come back in call order
    torch.testing.assert_close(res.activations, tiny_smol.capture([p.text for p in prompts], progress=False),
                               atol=1e-5, rtol=0)
    # an explicit budget is every task's
    fixed = icl_accuracy(tiny_smol, prompts, max_new_tokens=5, progress=False)
    assert fixed.budgets == {"short": 5, "long": 5}


def test_generate_by_budget_groups_calls_and_keeps_per_prompt_hooks(tiny_smol):
    from taskvec_interp import hooks as H

    texts = ["01 10 ->", "11 ->", "0 1 1 ->", "1 ->", "10 ->"]
    budgets = [3, 1, 3, 2, 1]
    assert [(b, i.tolist()) for b, i in budget_groups(budgets)] == [(3, [0, 2]), (2, [3]), (1, [1, 4])]
    g = torch.Generator().manual_seed(0)
    per = torch.randn(len(texts), tiny_smol.d_model, generator=g) * 20
    hooks = [(H.Site(tiny_smol.n_layers - 1), H.replace(per))]
    got = generate_by_budget(tiny_smol, texts, budgets, hooks=hooks, batch_size=2, progress=False)
    for i, (text, b) in enumerate(zip(texts, budgets, strict=True)):  # one prompt at a time, its own vector
        alone = tiny_smol.generate([text], b, hooks=[(H.Site(tiny_smol.n_layers - 1), H.replace(per[i]))],
                                   progress=False)
        assert got.tokens[i] == alone.tokens[0], i
        assert len(got.tokens[i]) <= b
