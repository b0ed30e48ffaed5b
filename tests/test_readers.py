"""Readers refuse bad input before any work (issue 14).

Every bad treebank or task folder raises ValueError naming the file and the problem (line, byte offset or
record where there is one) and leaves nothing on disk. (First-token accuracy, once tested here, is in
test_scoring.py.)
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from taskvec_interp import tasks as T
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
