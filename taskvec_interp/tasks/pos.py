"""Part-of-speech tasks from a Universal Dependencies treebank.

Task ``T``: input = a sentence (its ``# text =`` line), output = the first word of the sentence whose
UPOS tag is ``T``. Default tags NOUN, ADJ, VERB, ADV, ADP (the paper's "preposition"), PRON; labels
in that order, Null last. The paper used Penn Treebank WSJ (licensed); UD gives the same task under
an open licence. Only sentences containing *all* the tags are kept, so every task is defined on the
same sentences; duplicate sentence texts keep their first occurrence.

Words are the syntactic words of the treebank: multiword-token lines (ids like ``3-4``, e.g.
"don't" = "do" + "n't") and empty nodes (``5.1``) are skipped, so an answer can be a part of a
contracted token ("do"). Null task: the sentence paired with a uniformly random word of it, redrawn
at every sample; punctuation and symbols (UPOS PUNCT, SYM) are not words and are never drawn.

Treebank source, in order: ``path`` (a .conllu / .conllu.gz file, a folder of them, or a list), the
environment variable ``TASKVEC_UD_PATH`` (same forms; several paths joined by ``os.pathsep``), or a
download of UD_English-EWT (tag r2.15, dev split by default) from its public GitHub repository into
``platformdirs.user_cache_dir("taskvec_interp")``, verified against a pinned SHA-256. ``path="excerpt"``
reads the excerpt shipped inside the package (:data:`UD_EXCERPT`: the first 300 sentences of the EWT dev
split, 66 of which hold all six default tags; CC BY-SA 4.0, see its README.md), so the family builds
offline on a machine with nothing else; a run on it says so (its ``sources``).

Split (OPEN; the paper used 80/20): ``split="train"``/``"test"`` keeps a seeded 80/20 partition of
the surviving sentences, shared by every task including Null.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import conllu

from ..checkpoints import sha256_file
from .base import ExampleTask, RandomOutputTask, TaskFamily, decode_utf8, split_indices

__all__ = [
    "NON_WORD_UPOS",
    "POS_TAGS",
    "UD_ENV_VAR",
    "UD_EWT_SHA256",
    "UD_EWT_TAG",
    "UD_EWT_URL",
    "ChecksumError",
    "Sentence",
    "UD_EXCERPT",
    "download_ud_english_ewt",
    "filter_sentences",
    "pos_family",
    "read_conllu",
    "resolve_ud_paths",
]

POS_TAGS: tuple[str, ...] = ("NOUN", "ADJ", "VERB", "ADV", "ADP", "PRON")
NON_WORD_UPOS = frozenset({"PUNCT", "SYM"})
UD_ENV_VAR = "TASKVEC_UD_PATH"
UD_EWT_TAG = "r2.15"
UD_EWT_URL = (
    "https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/{tag}/en_ewt-ud-{split}.conllu"
)
UD_EWT_SHA256: dict[tuple[str, str], str] = {
    ("r2.15", "dev"): "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6",
}
"""Pinned checksums of downloadable files, keyed by (tag, split)."""


class ChecksumError(ValueError):
    """A downloaded or cached file does not match its expected SHA-256."""


@dataclass(frozen=True)
class Sentence:
    """A treebank sentence: raw text plus its syntactic words and their UPOS tags."""

    text: str
    words: tuple[str, ...]
    upos: tuple[str, ...]
    sent_id: str | None = None

    def first_with(self, tag: str) -> str | None:
        """The first word tagged ``tag`` (None if absent)."""
        for w, t in zip(self.words, self.upos, strict=True):
            if t == tag:
                return w
        return None


# --------------------------------------------------------------------------------------------------
# Download and cache
# --------------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("taskvec_interp"))


def download_ud_english_ewt(
    split: str = "dev",
    *,
    tag: str = UD_EWT_TAG,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    sha256: str | None = None,
    verify: bool = True,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Path of ``en_ewt-ud-{split}.conllu`` in the cache, downloading it if needed.

    The file is written atomically (temporary file + rename) after its SHA-256 matches ``sha256``
    or the pinned :data:`UD_EWT_SHA256` entry; a cached file is re-verified and re-downloaded if it
    does not match. Splits without a pinned checksum need ``sha256=`` or ``verify=False``.
    ``url`` overrides the GitHub address (any URL urllib opens, e.g. ``file://``). With ``verify=False``
    the download is parsed before it is cached, and a file :func:`read_conllu` refuses is not kept.
    Raises :class:`ChecksumError` on a mismatch, ``ValueError`` on an unverified download that is not
    CoNLL-U and ``ConnectionError`` when the download fails.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', got {split!r}")
    expected = sha256 if sha256 is not None else UD_EWT_SHA256.get((tag, split))
    if verify and expected is None:
        raise ValueError(
            f"no pinned checksum for UD_English-EWT {tag} {split}; pass sha256=... or verify=False"
        )
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = root / "ud" / f"UD_English-EWT-{tag}" / f"en_ewt-ud-{split}.conllu"
    if target.exists() and not force:
        if not verify or sha256_file(target) == expected:
            return target
        warnings.warn(f"cached {target} fails its checksum; downloading it again", stacklevel=2)
    src = url if url is not None else UD_EWT_URL.format(tag=tag, split=split)

    def offline(e: BaseException) -> ConnectionError:
        return ConnectionError(
            f"could not download {src}: {e}. Offline? Pass path=... to pos_family or set "
            f"{UD_ENV_VAR} to a local .conllu file or folder."
        )

    try:
        resp = urllib.request.urlopen(src, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        raise offline(e) from e
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with resp, os.fdopen(fd, "wb") as out:
            while True:
                try:
                    block = resp.read(1 << 20)
                except OSError as e:
                    raise offline(e) from e
                if not block:
                    break
                h.update(block)
                out.write(block)
        got = h.hexdigest()
        if verify and got != expected:
            raise ChecksumError(f"checksum mismatch for {src}: expected sha256 {expected}, got {got}")
        if not verify:  # unverified bytes: cache them only if they are a complete CoNLL-U file
            try:
                read_conllu(tmp)
            except ValueError as e:
                why = str(e).removeprefix(f"{tmp}: ")  # the temporary file is gone: name the source
                raise ValueError(f"downloaded {src} is not a usable treebank, not cached: {why}") from e
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


UD_EXCERPT = Path(__file__).resolve().parent / "data" / "ud_english_ewt" / "en_ewt-ud-dev.conllu"
"""The UD English EWT excerpt shipped with the package (first 300 sentences of the v2.15 dev split, byte for
byte; CC BY-SA 4.0, licence and provenance beside it): ``path="excerpt"``."""
EXCERPT = "excerpt"


def resolve_ud_paths(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    download: bool = True,
    ud_split: str = "dev",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """The CoNLL-U files to read: ``path``, else ``$TASKVEC_UD_PATH``, else the cached EWT download.
    ``path="excerpt"``: the excerpt shipped with the package (:data:`UD_EXCERPT`)."""
    if isinstance(path, str) and path == EXCERPT:
        return [UD_EXCERPT]
    if path is None:
        env = os.environ.get(UD_ENV_VAR)
        if env:
            path = [p for p in env.split(os.pathsep) if p]
    if path is None:
        if not download:
            raise ValueError(f"no treebank given: pass path=..., set {UD_ENV_VAR}, or allow download=True")
        return [download_ud_english_ewt(ud_split, cache_dir=cache_dir)]
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted([*p.glob("*.conllu"), *p.glob("*.conllu.gz")])
            if not found:
                raise ValueError(f"folder {p} holds no .conllu or .conllu.gz file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"treebank path {p} does not exist")
    return files


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


_COLUMN_SPLIT = re.compile(r"\t| {2,}")  # how conllu splits a token line into its fields
N_COLUMNS = 10


def _read_treebank_text(path: Path) -> str:
    """The whole text of a .conllu or .conllu.gz file (universal newlines, as ``open`` reads).

    ValueError names the file and the problem: a truncated or corrupted gzip stream, bytes that are not
    UTF-8 (offset and line), an empty file.
    """
    gz = path.name.endswith(".gz")
    with open(path, "rb") as f:  # a missing file stays a FileNotFoundError
        if gz:
            try:
                raw = gzip.GzipFile(fileobj=f, mode="rb").read()
            except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise ValueError(f"{path}: not a readable gzip file, truncated or corrupted ({e})") from e
        else:
            raw = f.read()
    if not raw.strip():
        raise ValueError(f"{path}: empty file{' (decompresses to nothing)' if gz else ''}: no sentences")
    text = decode_utf8(raw, path, what="of the decompressed text" if gz else "")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _check_conllu_lines(path: Path, text: str) -> None:
    """Every token line holds 10 fields (or as many as ``# global.columns``) and every sentence, the last
    one included, ends with a blank line; ValueError names the file and the line.

    A file cut mid-line leaves either a short last token line or a last sentence without its closing
    blank line, so both rules together refuse a truncated file wherever the cut falls.
    """
    expected = N_COLUMNS
    open_at: int | None = None  # line of the current sentence's first token line
    complete = text.endswith("\n")  # else the last line is cut
    lines = text.split("\n")
    if complete:
        lines.pop()  # what follows the last newline is not a line
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            open_at = None
            continue
        if s.startswith("#"):
            if s.startswith("# global.columns ="):
                expected = len(s.split("=", 1)[1].split())
            continue
        cols = len(_COLUMN_SPLIT.split(s))
        if cols != expected:
            raise ValueError(
                f"{path}: line {n} has {cols} tab-separated columns, expected {expected} (a cut or malformed "
                f"token line): {s[:80]!r}"
            )
        if open_at is None:
            open_at = n
    if open_at is not None:
        cut = "ends after line" if complete else "ends in the middle of line"
        raise ValueError(
            f"{path}: {cut} {len(lines)} inside the sentence that starts at line {open_at} (no closing blank "
            f"line): the file looks truncated"
        )


def _rebuild_text(tokens: conllu.TokenList) -> str:
    """Surface text from the tokens when ``# text =`` is missing (honours SpaceAfter=No)."""
    parts: list[str] = []
    covered = 0
    for tok in tokens:
        tid = tok["id"]
        if isinstance(tid, tuple) and tid[1] == "-":
            covered = tid[2]
        elif not isinstance(tid, int) or tid <= covered:
            continue
        misc = tok.get("misc") or {}
        parts.append(tok["form"] + ("" if misc.get("SpaceAfter") == "No" else " "))
    return "".join(parts).strip()


def read_conllu(paths: Path | str | Iterable[Path | str]) -> list[Sentence]:
    """Parse CoNLL-U files (plain or gzipped) into sentences of syntactic words.

    Each file is read and checked whole before it is parsed; a ValueError names the file and what is
    wrong: a truncated or corrupted gzip stream, bytes that are not UTF-8 (byte offset and line), an
    empty file or one without token lines, a token line without its 10 fields or a last sentence without
    its closing blank line (line number: a file cut mid-way), or what ``conllu`` refuses.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    sentences: list[Sentence] = []
    for path in map(Path, paths):
        text = _read_treebank_text(path)
        _check_conllu_lines(path, text)
        n_before = len(sentences)
        try:
            for toks in conllu.parse_incr(io.StringIO(text)):
                words = [t for t in toks if isinstance(t["id"], int)]
                if not words:
                    continue
                text_line = toks.metadata.get("text") or _rebuild_text(toks)
                sentences.append(
                    Sentence(
                        text=text_line,
                        words=tuple(t["form"] for t in words),
                        upos=tuple(t["upos"] for t in words),
                        sent_id=toks.metadata.get("sent_id"),
                    )
                )
        except conllu.exceptions.ParseException as e:
            raise ValueError(f"{path}: not valid CoNLL-U: {e}") from e
        if len(sentences) == n_before:
            raise ValueError(f"{path}: holds no sentence with a word (no token lines)")
    return sentences


def filter_sentences(
    sentences: Iterable[Sentence], tags: Sequence[str] = POS_TAGS, *, max_words: int | None = None
) -> list[Sentence]:
    """Sentences containing every tag in ``tags`` (and at most ``max_words`` words), first
    occurrence of each text kept."""
    need = set(tags)
    seen: set[str] = set()
    out = []
    for s in sentences:
        if s.text in seen or not need <= set(s.upos):
            continue
        if max_words is not None and len(s.words) > max_words:
            continue
        seen.add(s.text)
        out.append(s)
    return out


def pos_family(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    tags: Sequence[str] = POS_TAGS,
    split: str = "all",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_words: int | None = None,
    download: bool = True,
    ud_split: str = "dev",
    cache_dir: str | os.PathLike[str] | None = None,
    sentences: Sequence[Sentence] | None = None,
) -> TaskFamily:
    """The POS family: one task per tag (labels in ``tags`` order) plus Null (last label).

    ``sentences`` (already parsed, e.g. from :func:`read_conllu`) bypasses reading files.
    """
    tags = tuple(tags)
    if not tags or len(set(tags)) != len(tags):
        raise ValueError(f"tags must be non-empty and distinct, got {tags}")
    sources: list[str] = []
    if sentences is None:
        files = resolve_ud_paths(path, download=download, ud_split=ud_split, cache_dir=cache_dir)
        sources = [str(f) for f in files]
        sentences = read_conllu(files)
    kept = filter_sentences(sentences, tags, max_words=max_words)
    kept = [kept[i] for i in split_indices(len(kept), split, test_fraction, split_seed, key="pos")]
    if len(kept) < 2:
        raise ValueError(
            f"only {len(kept)} sentences contain all of {tags} (split={split!r}); need at least 2"
        )
    tasks = [
        ExampleTask(tag, [(s.text, s.first_with(tag)) for s in kept])  # type: ignore[misc]
        for tag in tags
    ]
    words = [
        [w for w, t in zip(s.words, s.upos, strict=True) if t not in NON_WORD_UPOS] or list(s.words)
        for s in kept
    ]
    null = RandomOutputTask([s.text for s in kept], per_input_outputs=words)
    info = {
        "family": "pos",
        "tags": tags,
        "sources": sources,
        "n_sentences": len(kept),
        "split": split,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
        "max_words": max_words,
    }
    return TaskFamily("pos", tasks, null, info=info)
