"""The pure parts of augmentation: prompts, grounding, weights, shards (no LLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from llmser_ray.augment.grounding import ground_lines, ground_numbers, ground_whole, split_lines
from llmser_ray.augment.prompts import (
    selection_messages,
    selection_schema,
    validation_choices,
    validation_messages,
)
from llmser_ray.augment.shards import ShardWriter
from llmser_ray.augment.weights import decay_weights, order_by_candidate_rank

CANDS = np.array([40, 41, 42, 43, 44])


def test_selection_prompt_numbers_candidates_and_bounds_titles() -> None:
    msgs = selection_messages(["Tea " * 40, "Mug"], ["A", "B", ""], n=5, numbered=True)
    user = msgs[-1]["content"]
    assert "1. A\n2. B\n3. (untitled item)" in user
    assert "JSON list of 3 different candidate numbers" in user  # n capped at the candidates
    assert max(len(line) for line in user.splitlines()) < 200
    free = selection_messages(["Mug"], ["A", "B"], n=2, numbered=False)[-1]["content"]
    assert "- A\n- B" in free and "one per line" in free
    schema = selection_schema(20, 15)
    assert schema["items"] == {"type": "integer", "minimum": 1, "maximum": 20}
    assert schema["maxItems"] == 15
    assert "Which ONE" in validation_messages(["Mug"], ["A"])[-1]["content"]
    assert validation_choices(3) == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("reply", "truncated", "items", "status", "counts"),
    [
        ("[2, 1, 2, 9, 5]", False, [41, 40, 44], "ok", (5, 3, 1, 1)),
        ("[3, 4]", False, [42], "ok", (2, 2, 0, 0)),  # n = 1 keeps the first, counts both
        ("", False, [], "empty", (0, 0, 0, 0)),
        ("   ", False, [], "empty", (0, 0, 0, 0)),
        ("Sure! I pick 2 and 3", False, [], "malformed", (1, 0, 1, 0)),
        ("[7, 8]", False, [], "malformed", (2, 0, 2, 0)),  # names nothing in the list
        ("[2, 3, 4", True, [41, 42], "truncated", (2, 2, 0, 0)),  # the cut "4" is dropped
        ("[", True, [], "truncated", (0, 0, 0, 0)),
        ('{"a": 1}', False, [], "malformed", (1, 0, 1, 0)),
        ("[true, 1.0, \"2\"]", False, [40, 41], "ok", (3, 2, 1, 0)),
    ],
)
def test_ground_numbers(reply: str, truncated: bool, items: list[int], status: str,
                        counts: tuple[int, int, int, int]) -> None:
    n = 1 if reply == "[3, 4]" else 3
    g = ground_numbers(reply, CANDS, n=n, truncated=truncated)
    assert g.items == items and g.status == status
    assert (g.n_lines, g.n_mapped, g.n_unmapped, g.n_duplicates) == counts
    assert g.n_lines == g.n_mapped + g.n_unmapped + g.n_duplicates


def test_split_lines_strips_numbering_and_bullets() -> None:
    reply = "1. Green Tea\n- \"Black Tea\"\n\n  * Mug  \n3) Kettle\n(4) Cup\n• Spoon"
    assert split_lines(reply) == ["Green Tea", "Black Tea", "Mug", "Kettle", "Cup", "Spoon"]


def test_ground_lines_exact_then_similarity_then_hallucination() -> None:
    titles = ["Green Tea", "Black Tea", "Mug", "Kettle", "Cup"]
    lines = ["green tea!", "A mug for tea", "Spaceship", "Green Tea"]
    sims = np.array([0.3, 0.8, 0.2, 0.9])
    best = np.array([0, 2, 4, 0])
    g = ground_lines(lines, sims, best, CANDS, titles, n=3, min_similarity=0.6)
    assert g.items == [40, 42]  # exact match despite low sim; "mug" by similarity
    assert (g.n_lines, g.n_mapped, g.n_unmapped, g.n_duplicates) == (4, 2, 1, 1)
    assert g.status == "ok"
    bad = ground_lines(["Spaceship"], np.array([0.1]), np.array([1]), CANDS, titles, 3, 0.6)
    assert bad.status == "malformed" and bad.items == []


def test_whole_response_always_answers_but_counts_hallucinations() -> None:
    g = ground_whole(np.array([0.1, 0.9, 0.5, 0.2, 0.8]), CANDS, 3, ["a", "b"],
                     np.array([0.1, 0.7]), min_similarity=0.6)
    assert g.items == [41, 44, 42]
    assert g.n_unmapped == 1 and g.n_mapped == 1


def test_step_and_smooth_decay() -> None:
    r = np.array([0.8, 0.8, -0.3, np.nan, 1.5])
    length = np.array([3, 10, 2, 2, 2])
    assert decay_weights(r, length, "step", 0.5, 4).tolist() == [0.8, 0.4, 0.0, 0.0, 1.0]
    smooth = decay_weights(r, length, "smooth", 0.5, 4)
    assert smooth[0] == pytest.approx(0.8) and smooth[1] == pytest.approx(0.8 * np.exp(-3))
    with pytest.raises(ValueError):
        decay_weights(r, length, "linear", 0.5, 4)


def test_order_by_candidate_rank_puts_the_best_next_to_the_history() -> None:
    assert order_by_candidate_rank(np.array([42, 40, 44]), CANDS).tolist() == [44, 42, 40]


def test_shard_writer_writes_complete_shards_and_resumes(tmp_path: Path) -> None:
    users = np.arange(1, 11)
    w = ShardWriter(tmp_path / "p", users, shard_size=4)
    assert w.n_shards == 3 and w.pending_mask().all()
    w.add(pa.table({"user_id": [3, 1, 9], "x": [3, 1, 9]}))
    assert not w.done
    w.add(pa.table({"user_id": [4, 2], "x": [4, 2]}))
    assert w.done == {0}
    w.add(pa.table({"user_id": [10], "x": [10]}))  # shard 2 has users 9, 10
    assert w.done == {0, 2}
    again = ShardWriter(tmp_path / "p", users, shard_size=4)  # an interrupted run, restarted
    assert again.reused == 2 and users[again.pending_mask()].tolist() == [5, 6, 7, 8]
    again.add(pa.table({"user_id": [5, 6, 7, 8], "x": [5, 6, 7, 8]}))
    assert again.complete
    out = again.assemble()
    assert out.column("user_id").to_pylist() == list(range(1, 11))
    assert json.dumps(out.column("x").to_pylist())
