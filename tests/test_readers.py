"""Readers refuse bad input before any work (issue 14), and first-token accuracy scores content.

Every bad treebank or task folder raises ValueError naming the file and the problem (line, byte offset or
record where there is one) and leaves nothing on disk; first-token accuracy skips leading whitespace-only
tokens, on a tokenizer that splits spaces off and on SmolLM2's real one.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from taskvec_interp import tasks as T
from taskvec_interp.adapters.base import Generation
from taskvec_interp.probes.accuracy import first_token_match, icl_accuracy, score_generation
from taskvec_interp.tasks import pos as pos_mod

# Two sentences holding all six default tags (so pos_family accepts the file) and one without.
GOOD_CONLLU = """\
# sent_id = s1
# text = They often eat big apples in Paris.
1\tThey\tthey\tPRON\t_\t_\t3\tnsubj\t_\t_
2\toften\toften\tADV\t_\t_\t3\tadvmod\t_\t_
3\teat\teat\tVERB\t_\t_\t0\troot\t_\t_
4\tbig\tbig\tADJ\t_\t_\t5\tamod\t_\t_
5\tapples\tapple\tNOUN\t_\t_\t3\tobj\t_\t_
6\tin\tin\tADP\t_\t_\t7\tcase\t_\t_
7\tParis\tParis\tPROPN\t_\t_\t3\tobl\t_\tSpaceAfter=No
8\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_

# sent_id = s2
# text = Dogs bark.
1\tDogs\tdog\tNOUN\t_\t_\t2\tnsubj\t_\t_
2\tbark\tbark\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No
3\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_

# sent_id = s3
# text = We saw a red car there at noon!
1\tWe\twe\tPRON\t_\t_\t2\tnsubj\t_\t_
2\tsaw\tsee\tVERB\t_\t_\t0\troot\t_\t_
3\ta\ta\tDET\t_\t_\t5\tdet\t_\t_
4\tred\tred\tADJ\t_\t_\t5\tamod\t_\t_
5\tcar\tcar\tNOUN\t_\t_\t2\tobj\t_\t_
6\tthere\tthere\tADV\t_\t_\t2\tadvmod\t_\t_
7\tat\tat\tADP\t_\t_\t8\tcase\t_\t_
8\tnoon\tnoon\tNOUN\t_\t_\t2\tobl\t_\tSpaceAfter=No
9\t!\t!\tPUNCT\t_\t_\t2\tpunct\t_\t_

"""
N_LINES = GOOD_CONLLU.count("\n") - 1  # the last line is the closing blank line


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _refused(tmp_path: Path, name: str, content: bytes, *, match: str) -> str:
    """Write ``content`` to ``tmp_path/name``; read_conllu and pos_family must both refuse it with a
    ValueError naming the file and matching ``match``, writing nothing (cache included)."""
    p = tmp_path / "tb" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(content)
    before = _files(tmp_path)
    for read in (T.read_conllu, lambda q: T.pos_family(q, download=False)):
        with pytest.raises(ValueError, match=match) as err:
            read(p)
        assert str(p) in str(err.value)
    assert _files(tmp_path) == before
    return str(err.value)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Any download/cache write of pos.py lands in tmp_path/cache (checked empty by the tests)."""
    monkeypatch.setattr(pos_mod, "_default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv(T.UD_ENV_VAR, raising=False)


def test_good_treebank_still_reads(tmp_path):
    p = tmp_path / "good.conllu"
    p.write_text(GOOD_CONLLU, encoding="utf-8")
    sents = T.read_conllu(p)
    assert [s.sent_id for s in sents] == ["s1", "s2", "s3"]
    assert T.pos_family(p).info["n_sentences"] == 2
    crlf = tmp_path / "crlf.conllu"  # Windows line endings and a byte-order mark are fine
    crlf.write_bytes(b"\xef\xbb\xbf" + GOOD_CONLLU.replace("\n", "\r\n").encode())
    assert T.read_conllu(crlf) == sents


# --------------------------------------------------------------------------------------------------
# CoNLL-U
# --------------------------------------------------------------------------------------------------


def test_conllu_cut_mid_line_names_the_line(tmp_path):
    cut = GOOD_CONLLU[: GOOD_CONLLU.index("\tnoon\tnoon") + len("\tnoon\tno")]
    line = cut.count("\n") + 1
    msg = _refused(tmp_path, "cut.conllu", cut.encode(), match=f"line {line} has 3 tab-separated columns, expected 10")
    assert "8\\tnoon\\tno" in msg


def test_conllu_cut_inside_the_last_field_is_refused(tmp_path):
    """10 columns survive a cut inside MISC: the missing closing blank line gives it away."""
    cut = GOOD_CONLLU[: GOOD_CONLLU.rindex("SpaceAfter=No") + len("SpaceAf")]
    line = cut.count("\n") + 1
    start = GOOD_CONLLU.count("\n", 0, GOOD_CONLLU.index("# sent_id = s3")) + 3  # s3's first token line
    _refused(tmp_path, "cut.conllu", cut.encode(),
             match=f"ends in the middle of line {line} inside the sentence that starts at line {start} "
                   r"\(no closing blank line\): the file looks truncated")


def test_conllu_without_closing_blank_line_is_refused(tmp_path):
    cut = GOOD_CONLLU.rstrip("\n") + "\n"  # cut exactly at the end of a token line
    _refused(tmp_path, "noblank.conllu", cut.encode(), match=f"ends after line {N_LINES} inside the sentence")


def test_conllu_malformed_line_in_the_middle(tmp_path):
    bad = GOOD_CONLLU.replace("2\tbark\tbark\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No",
                              "2\tbark\tbark\tVERB\t_\t_\t0\troot")
    line = GOOD_CONLLU.count("\n", 0, GOOD_CONLLU.index("2\tbark")) + 1
    _refused(tmp_path, "short.conllu", bad.encode(), match=f"line {line} has 8 tab-separated columns")


def test_conllu_latin1_names_offset_and_line(tmp_path):
    text = GOOD_CONLLU.replace("Paris", "Café")  # é: one byte 0xe9 in latin-1, invalid as UTF-8 here
    raw = text.encode("latin-1")
    offset = raw.index(b"\xe9")
    line = raw.count(b"\n", 0, offset) + 1
    msg = _refused(tmp_path, "latin1.conllu", raw,
                   match=f"not UTF-8 text: byte 0xe9 at byte offset {offset} \\(line {line}, ")
    assert "re-encode the file as UTF-8" in msg
    gz = gzip.compress(raw)
    _refused(tmp_path, "latin1.conllu.gz", gz, match=f"byte offset {offset} of the decompressed text")


def test_conllu_gzip_truncated_corrupted_or_not_gzip(tmp_path):
    gz = gzip.compress(GOOD_CONLLU.encode(), mtime=0)
    _refused(tmp_path, "trunc.conllu.gz", gz[: len(gz) // 2], match="not a readable gzip file, truncated or corrupted")
    bad_crc = gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:]
    _refused(tmp_path, "crc.conllu.gz", bad_crc, match="not a readable gzip file.*CRC")
    _refused(tmp_path, "plain.conllu.gz", GOOD_CONLLU.encode(), match="not a readable gzip file.*Not a gzipped file")
    # a gzip stream under a plain name: a UTF-8 error that says what it looks like
    _refused(tmp_path, "zipped.conllu", gz, match=r"not UTF-8 text.*looks gzip-compressed: name it \.gz")


def test_conllu_empty_files(tmp_path):
    _refused(tmp_path, "empty.conllu", b"", match="empty file: no sentences")
    _refused(tmp_path, "blank.conllu", b"\n\n  \n", match="empty file: no sentences")
    _refused(tmp_path, "empty.conllu.gz", gzip.compress(b""), match=r"empty file \(decompresses to nothing\)")
    _refused(tmp_path, "comments.conllu", b"# newdoc id = x\n# sent_id = 1\n\n", match="no sentence with a word")


def test_bad_file_among_good_ones_is_named(tmp_path):
    good = tmp_path / "tb" / "a.conllu"
    good.parent.mkdir()
    good.write_text(GOOD_CONLLU, encoding="utf-8")
    bad = good.parent / "b.conllu"
    bad.write_bytes(GOOD_CONLLU[:-30].encode())
    with pytest.raises(ValueError) as err:
        T.pos_family(good.parent, download=False)
    assert str(bad) in str(err.value) and str(good) not in str(err.value)


def test_unverified_bad_download_is_not_cached(tmp_path):
    src = tmp_path / "src" / "en_ewt-ud-train.conllu"
    src.parent.mkdir()
    src.write_bytes(GOOD_CONLLU[:-30].encode())
    with pytest.raises(ValueError, match=f"downloaded {re.escape(src.as_uri())} is not a usable treebank, not cached: "
                                         "ends in the middle of line 27 inside the sentence"):
        T.download_ud_english_ewt("train", url=src.as_uri(), verify=False)
    assert not (tmp_path / "cache").exists() or _files(tmp_path / "cache") == []
    src.write_text(GOOD_CONLLU, encoding="utf-8")  # a good unverified download is cached as before
    got = T.download_ud_english_ewt("train", url=src.as_uri(), verify=False)
    assert got.parent.parent.parent == tmp_path / "cache" and got.read_text() == GOOD_CONLLU


# --------------------------------------------------------------------------------------------------
# task folders
# --------------------------------------------------------------------------------------------------


def _folder_refuses(folder: Path, match: str, **kw) -> str:
    before = _files(folder)
    with pytest.raises(ValueError, match=match) as err:
        T.files_family(folder, **kw)
    assert _files(folder) == before
    return str(err.value)


def _task(folder: Path, name: str, content) -> Path:
    folder.mkdir(exist_ok=True)
    p = folder / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


GOOD_TASK = [{"input": "a", "output": "A"}, {"input": "b", "output": "B"}]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"input": "a", "output": "A"},\n {"input": "b" "output": "B"}]',
         r"not valid JSON \(Expecting ',' delimiter: line 2 column 16 "),
        (b"", r"empty file \(0 bytes\): expected a JSON list of examples"),
        (b"  \n", r"empty file \(3 bytes\)"),
        ('[{"input": "caf\xe9", "output": "x"}]'.encode("latin-1"),
         r"not UTF-8 text: byte 0xe9 at byte offset 15 \(line 1, byte 16 of the line\)"),
        ({"input": "a", "output": "A"}, "expected a JSON list of {'input', 'output'} objects, got dict"),
        ([], r"the task has no examples \(empty list\)"),
        ([*GOOD_TASK, "c"], "item 2 is a str, expected an object"),
        ([*GOOD_TASK, {"input": "c"}], "item 2 has no 'output' key"),
        ([*GOOD_TASK, {"input": ["c"], "output": "C"}], "item 2 'input' is a list, expected a string"),
        ([*GOOD_TASK, {"input": "c", "output": None}], "item 2 'output' is a NoneType, expected a string"),
        ([*GOOD_TASK, {"input": "c", "output": "  "}],
         r"item 2 has an empty input or output \('output' empty after stripping whitespace\)"),
        ([{"input": "", "output": ""}], r"item 0 has an empty input or output \('input' and 'output' empty"),
    ],
)
def test_bad_task_file_names_file_and_record(tmp_path, content, match):
    folder = tmp_path / "tasks"
    _task(folder, "good.json", GOOD_TASK)
    bad = _task(folder, "bad.json", content)
    msg = _folder_refuses(folder, match)
    assert msg.startswith(f"{bad}: ")


def test_empty_task_folder(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    _folder_refuses(folder, f"task folder {re.escape(str(folder))} holds no .json files$")
    _task(folder / "abstractive", "t.json", GOOD_TASK)  # the parent of the task folders
    msg = _folder_refuses(folder, "holds no .json files")
    assert msg.endswith("(its subfolders abstractive do: pass one of them)")


def test_duplicate_task_names(tmp_path):
    folder = tmp_path / "tasks"
    _task(folder, "a.json", GOOD_TASK)
    _task(folder, "b.json", GOOD_TASK)
    msg = _folder_refuses(folder, r"tasks= names \['a'\] more than once", tasks=["a", "b", "a"])
    assert str(folder) in msg
    with pytest.raises(TypeError, match="the string 'a'"):
        T.files_family(folder, tasks="a")
    assert T.files_family(folder, tasks=["b", "a"]).task_names == ("b", "a", "null")


# --------------------------------------------------------------------------------------------------
# first-token accuracy
# --------------------------------------------------------------------------------------------------


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


def _prompt(query: str, target: str) -> T.Prompt:
    builder = T.PromptBuilder(T.PromptTemplate())
    return builder.render(T.Example(query, target), [T.Example("y", "pear")], task="t", label=0, family="toy")


def _gen(tok, texts: list[str]) -> Generation:
    return Generation(texts=texts, tokens=[tok(t, add_special_tokens=False)["input_ids"] for t in texts])


def test_first_token_skips_a_split_off_space(space_tokenizer):
    tok = space_tokenizer
    p = _prompt("x", "apples")
    assert p.text.endswith(" ->") and p.answer == " apples"
    (check,) = T.check_tokenization(tok, [p])
    assert check.ok and [tok.decode([i]) for i in check.answer_ids] == [" ", "apples"]
    assert check.first_content == "apples"
    gens = [" dog\n", " apples\n", "apples", "  apples", "\napples", " ", ""]
    frame = score_generation([p] * len(gens), _gen(tok, gens), [check] * len(gens))
    assert frame["first_token"].tolist() == [False, True, True, True, False, False, False]
    assert frame["exact"].tolist() == [False, True, True, True, False, False, False]
    # the old definition (first token ids) scored the space: ' dog' counted as right
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
    frame = score_generation(prompts, _gen(tok, flipped), checks)
    assert not frame["first_token"].any() and not frame["exact"].any()
    old = [tok(g, add_special_tokens=False)["input_ids"][0] == c.answer_ids[0] for g, c in
           zip(flipped, checks, strict=True)]
    assert all(old)  # the old definition gave 1.000 on these wrong answers
    right = [p.answer + "\n" for p in prompts]
    frame = score_generation(prompts, _gen(tok, right), checks)
    assert frame["first_token"].all() and frame["exact"].all()
    # first digit right, the rest wrong: first-token yes, exact no
    half = [" " + p.target[0] + ("1" if p.target[1] == "0" else "0") + p.target[2:] for p in prompts]
    frame = score_generation(prompts, _gen(tok, half), checks)
    assert frame["first_token"].all() and not frame["exact"].any()


def test_first_token_on_smollm2_pos_answers(smol_tokenizer, shared_data):
    tok = smol_tokenizer
    fam = T.pos_family(shared_data / "ud_english_ewt" / "en_ewt-ud-dev.conllu")
    prompts = T.build_prompts(fam, n_per_task=2, shots=1, seed=0, tasks=["NOUN", "VERB"])
    checks = T.check_tokenization(tok, prompts)
    for p, c in zip(prompts, checks, strict=True):
        assert p.target.startswith(c.first_content) and c.first_content
        assert first_token_match(" " + p.target, c.first_content)
        assert first_token_match(p.target + " and more", c.first_content)
        assert not first_token_match(" \u00a7" + p.target, c.first_content)


def test_icl_accuracy_first_token_when_the_model_emits_space_then_a_wrong_digit(tiny_smol):
    """End to end on SmolLM2's tokenizer: force ' ' then the wrong first digit; the old id comparison
    gave first_token True (the forced space is the answer's first token), now it is False."""
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
