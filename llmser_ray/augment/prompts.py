"""The two prompts of LLMSeR: pseudo-prior selection (SIA) and next-item validation (ARV).

Both follow the reference prompts (METHOD.md) in substance. What we add:
- candidates are NUMBERED, so an answer can be constrained to candidate numbers (a JSON list
  for SIA, one choice for ARV) and grounding is exact instead of fuzzy;
- titles are cut to ``MAX_TITLE_CHARS`` and the history to the most recent
  ``augment.prompt_history`` items, so a prompt's length is bounded whatever the data;
- the free-text variant (``augment.grounding = lines``) keeps the reference's "names, one per
  line" instruction, for comparing hallucination rates with and without constraints.
"""

from __future__ import annotations

import json
from typing import Any

MAX_TITLE_CHARS = 90
SYSTEM = ("You are a shopping assistant for a recommender system. You read a customer's "
          "history of products and judge which other products fit it.")


def short(title: str) -> str:
    title = " ".join(title.split())
    return title if len(title) <= MAX_TITLE_CHARS else title[: MAX_TITLE_CHARS - 3].rstrip() + "..."


def _history_block(history: list[str]) -> str:
    return "\n".join(f"- {short(t) or '(untitled item)'}" for t in history)


def selection_messages(history: list[str], candidates: list[str], n: int,
                       numbered: bool) -> list[dict[str, str]]:
    """SIA: choose ``n`` candidates the user probably interacted with BEFORE this history."""
    n = min(n, len(candidates))
    if numbered:
        cands = "\n".join(f"{i + 1}. {short(t) or '(untitled item)'}" for i, t in enumerate(candidates))
        answer = (f"Answer with a JSON list of {n} different candidate numbers, most likely first, "
                  "for example [3, 1, 7].")
    else:
        cands = "\n".join(f"- {short(t) or '(untitled item)'}" for t in candidates)
        answer = f"Reply with only the names of the {n} items, one per line, most likely first."
    user = (f"The customer bought the following items, oldest first:\n{_history_block(history)}\n\n"
            f"Select the {n} items from the candidate list below that the customer most likely "
            f"bought BEFORE these, given their taste.\nCandidates:\n{cands}\n\n{answer}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def selection_schema(num_candidates: int, n: int) -> dict[str, Any]:
    """JSON schema for the constrained SIA answer: candidate numbers only, at most ``n``."""
    n = min(n, num_candidates)
    return {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": num_candidates},
            "minItems": 1, "maxItems": n}


SCORING_ASK = "Name one product this customer bought BEFORE these."
SCORING_ASK_NO_HISTORY = "Name one product a customer bought."
NEXT_ASK = "Name one product this customer will buy NEXT."
NEXT_ASK_NO_HISTORY = "Name one product a customer will buy."


def scoring_messages(history: list[str], next_item: bool = False) -> list[dict[str, str]]:
    """The ``score`` selector's prompt: the answer scored is one candidate's title (each candidate
    alone, so the order of a candidate list cannot matter). With an empty history this is the
    history-free prompt whose likelihood of a title is the PMI baseline: both prompts differ
    only by the history, so their difference measures what the history says about the title.
    ``next_item`` asks for the next purchase instead (ARV's scoring judge)."""
    ask, ask_alone = (NEXT_ASK, NEXT_ASK_NO_HISTORY) if next_item else (SCORING_ASK, SCORING_ASK_NO_HISTORY)
    if history:
        user = f"The customer bought the following items, oldest first:\n{_history_block(history)}\n\n{ask}"
    else:
        user = ask_alone
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def scoring_title(title: str) -> str:
    """How a candidate is written as the scored answer (the same cut as in every prompt)."""
    return short(title) or "(untitled item)"


def validation_messages(history: list[str], candidates: list[str]) -> list[dict[str, str]]:
    """ARV: which one candidate comes next after this (augmented) history."""
    cands = "\n".join(f"{i + 1}. {short(t) or '(untitled item)'}" for i, t in enumerate(candidates))
    user = (f"The customer bought the following items, oldest first:\n{_history_block(history)}\n\n"
            f"Which ONE of these candidates will the customer buy next?\n{cands}\n\n"
            "Answer with the candidate number only.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def validation_choices(num_candidates: int) -> list[str]:
    return [str(i + 1) for i in range(num_candidates)]


def request_row(request_id: str, messages: list[dict[str, str]], schema: dict[str, Any] | None = None,
                choices: list[str] | None = None, continuation: str = "") -> dict[str, Any]:
    """A row in the generation layer's request format (llmser_ray.llm); ``continuation`` makes
    it a scoring request (the likelihood of that text as the answer)."""
    return {"request_id": request_id, "messages": json.dumps(messages),
            "guided_json": json.dumps(schema) if schema else "", "guided_choice": list(choices or []),
            "continuation": continuation}
