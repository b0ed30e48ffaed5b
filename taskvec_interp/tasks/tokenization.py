"""Tokenization checks: how each prompt's answer tokenizes after its prompt (:class:`AnswerTokens`,
:func:`check_tokenization`) and the answer budget a generator needs (:func:`max_answer_tokens`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import check_count
from .prompts import Prompt

__all__ = ["AnswerTokens", "check_tokenization", "first_content_text", "max_answer_tokens"]


@dataclass(frozen=True)
class AnswerTokens:
    """How one prompt's answer tokenizes after its prompt.

    ``answer_ids``: the tokens that follow the prompt's tokens in ``tokenize(text + answer)`` (when
    ``prefix_ok``), else the answer tokenized alone. ``prefix_ok``: the prompt's tokens are a prefix
    of the joint tokenization (no token straddles the prompt/answer boundary). ``standalone_ok``:
    tokenizing the answer alone gives the same ids (false e.g. for SentencePiece tokenizers that
    prepend a word-start marker; informative only). ``roundtrip_ok``: decoding prompt + answer ids
    gives back decode(prompt) + answer. ``n_budget``: new tokens a generator needs to emit it.
    ``first_content``: the text of the answer's first *content* token, i.e. ``decode(answer_ids[:j + 1])``
    stripped of whitespace for the smallest ``j`` where that is non-empty and holds no partial character
    (U+FFFD); leading tokens that decode to whitespace only (SmolLM2 splits ``" 01101"`` into ``" "``,
    ``"0"``, ...) are skipped. First-token accuracy compares it with the generation.
    """

    answer_ids: tuple[int, ...]
    prompt_len: int
    prefix_ok: bool
    standalone_ok: bool
    roundtrip_ok: bool
    n_budget: int
    first_content: str = ""

    @property
    def ok(self) -> bool:
        """The answer is a clean continuation of the prompt's tokens."""
        return self.prefix_ok and self.roundtrip_ok


def first_content_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of the first content token of ``ids`` (see :attr:`AnswerTokens.first_content`)."""
    for j in range(len(ids)):
        text = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True).strip()
        if text and "\ufffd" not in text:
            return text
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=add_special_tokens)
    return [list(x) for x in enc["input_ids"]]


def check_tokenization(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    add_special_tokens: bool = False,
    strict: bool = False,
) -> list[AnswerTokens]:
    """Check ``tokenize(text + answer) == tokenize(text) + answer_ids`` for every prompt.

    ``tokenizer`` is any Hugging Face tokenizer (callable, with ``decode``). ``add_special_tokens``
    is passed to it (a BOS token does not change the split). With ``strict`` a ValueError lists the
    prompts whose answer does not tokenize cleanly; otherwise inspect ``.ok`` on each result.
    """
    if not prompts:
        return []
    texts = [p.text for p in prompts]
    p_ids = _ids(tokenizer, texts, add_special_tokens)
    f_ids = _ids(tokenizer, [p.text + p.answer for p in prompts], add_special_tokens)
    a_ids = _ids(tokenizer, [p.answer for p in prompts], False)
    out: list[AnswerTokens] = []
    for p, pi, fi, ai in zip(prompts, p_ids, f_ids, a_ids, strict=True):
        prefix_ok = fi[: len(pi)] == pi
        cont = fi[len(pi) :] if prefix_ok else ai
        decoded_full = tokenizer.decode(pi + cont, skip_special_tokens=True)
        decoded_prompt = tokenizer.decode(pi, skip_special_tokens=True)
        roundtrip_ok = decoded_full == decoded_prompt + p.answer
        out.append(
            AnswerTokens(
                answer_ids=tuple(cont),
                prompt_len=len(pi),
                prefix_ok=prefix_ok,
                standalone_ok=ai == cont,
                roundtrip_ok=roundtrip_ok,
                n_budget=max(len(cont), len(ai), len(fi) - len(pi)),
                first_content=first_content_text(tokenizer, cont),
            )
        )
    if strict:
        bad = [(p, r) for p, r in zip(prompts, out, strict=True) if not r.ok]
        if bad:
            shown = "; ".join(
                f"task={p.task!r} query={p.query!r} answer={p.answer!r} (prefix_ok={r.prefix_ok}, "
                f"roundtrip_ok={r.roundtrip_ok})"
                for p, r in bad[:5]
            )
            raise ValueError(
                f"{len(bad)} of {len(prompts)} answers do not tokenize as a clean continuation of their "
                f"prompt: {shown}. Check the template's whitespace (see PromptTemplate.answer_space)."
            )
    return out


def max_answer_tokens(
    tokenizer: Any, prompts: Sequence[Prompt], *, margin: int = 0, add_special_tokens: bool = False
) -> int:
    """Number of new tokens generation must allow so that every answer fits (plus ``margin``).

    Counts the worst case of the in-context and standalone tokenizations, so answers are never
    truncated even when they do not tokenize cleanly.
    """
    margin = check_count("margin", margin, 0)
    checks = check_tokenization(tokenizer, prompts, add_special_tokens=add_special_tokens)
    return max((c.n_budget for c in checks), default=0) + margin
