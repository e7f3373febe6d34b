"""``wrpo data build``: scored samples -> WRPO quadruples (x, y_ws, y_wt, y_l) (docs/method.md §1).

For each prompt: y_ws is the highest-scoring source response, y_wt the highest-scoring target response and
y_l the lowest-scoring target response (ties go to the first occurrence). With ``num_source_chosen`` k > 1
the chosen list holds the best response of each of the k best source models (ranked by their best
score), then y_wt: K = k + 2 responses. Responses with blank text are ignored (they cannot be trained on).
Prompts with no match in the other file, fewer than two target samples, all target scores equal or fewer
than k source models are skipped and counted; ``keep_tied`` keeps the prompts whose target scores are all
equal (y_wt and y_l are then the same response): rows for ``wrpo sft``, which uses y_ws only. Other
keys of a prompt's first source row (e.g. its reference ``answer``) are kept in its output row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from wrpo.data.construct.jsonl import write_jsonl
from wrpo.data.construct.rows import Response, SampleRow, check_same_prompt, read_sample_rows

NO_TARGET = "no target samples"
NO_SOURCE = "no source samples"
ONE_TARGET = "fewer than two target samples"
TIED_TARGETS = "all target scores equal"


def few_sources(k: int) -> str:
    return f"fewer than {k} source models"


@dataclass
class BuildSummary:
    """What ``build`` kept and skipped; ``str()`` is the printed report."""

    num_source_chosen: int = 1
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> prompts
    target_gaps: list[float] = field(default_factory=list)  # score(y_wt) - score(y_l)
    source_gaps: list[float] = field(default_factory=list)  # score(y_ws) - score(y_wt)
    wins: Counter = field(default_factory=Counter)  # source model of the top y_ws -> prompts
    blank: int = 0  # responses ignored for blank text

    def add(self, row: dict) -> None:
        """Count a kept output row."""
        s_ws, s_wt, s_l = row["chosen_scores"][0], row["chosen_scores"][-1], row["rejected_scores"][0]
        self.kept += 1
        self.target_gaps.append(s_wt - s_l)
        self.source_gaps.append(s_ws - s_wt)
        self.wins[row["source_models"][0]] += 1

    def __str__(self) -> str:
        k = self.num_source_chosen
        total = self.kept + sum(self.skipped.values())
        lines = [
            f"kept {self.kept} of {total} prompts (K = {k + 2}: {k} source + 1 target chosen, 1 rejected)"
        ]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())))
        for name, gaps in (("y_wt - y_l", self.target_gaps), ("y_ws - y_wt", self.source_gaps)):
            if gaps:
                lines.append(
                    f"score gap {name}: mean {mean(gaps):.4g}, min {min(gaps):.4g}, max {max(gaps):.4g}"
                )
        if self.wins:
            lines.append(
                "y_ws won by: "
                + ", ".join(f"{m} {n} ({n / self.kept:.0%})" for m, n in self.wins.most_common())
            )
        if self.blank:
            lines.append(f"responses with blank text ignored: {self.blank}")
        return "\n".join(lines)


def first_best(responses: list[Response]) -> Response:
    """The highest-scoring response; the first one on ties."""
    return max(responses, key=lambda r: r.score)  # max keeps the first maximal element


def first_worst(responses: list[Response]) -> Response:
    """The lowest-scoring response; the first one on ties."""
    return min(responses, key=lambda r: r.score)


def top_source_responses(responses: list[Response], k: int) -> list[Response]:
    """The best response of each source model, for the k best models ranked by that score; [] if fewer.

    Ties go to the first occurrence, within a model and between models (k = 1 gives ``first_best``)."""
    best: dict[str, tuple[float, int]] = {}  # model -> (-score, position) of its best response
    for i, r in enumerate(responses):
        best[r.model] = min(best.get(r.model, (-r.score, i)), (-r.score, i))
    ranked = sorted(best.values())
    return [responses[i] for _, i in ranked[:k]] if len(ranked) >= k else []


def quadruple(
    prompt_id,
    prompt,
    sources: list[Response],
    targets: list[Response],
    k: int,
    extras: dict | None = None,
    keep_tied: bool = False,
) -> tuple[dict | None, str | None]:
    """(the output row, None) or (None, why the prompt is skipped); ``extras`` are other keys to keep."""
    if len(targets) < 2:
        return None, ONE_TARGET
    y_wt, y_l = first_best(targets), first_worst(targets)
    if y_wt.score == y_l.score and not keep_tied:
        return None, TIED_TARGETS
    y_ws = top_source_responses(sources, k)
    if not y_ws:
        return None, few_sources(k)
    chosen = [*y_ws, y_wt]
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        **(extras or {}),
        "chosen": [{"role": "assistant", "content": r.text} for r in chosen],
        "rejected": [{"role": "assistant", "content": y_l.text}],
        "source_models": [r.model for r in y_ws],
        "chosen_scores": [r.score for r in chosen],
        "rejected_scores": [y_l.score],
    }, None


def build(
    sources: list[str | Path],
    targets: str | Path,
    output: str | Path,
    *,
    num_source_chosen: int = 1,
    keep_tied: bool = False,
) -> BuildSummary:
    """Reads every file (all rows checked first), writes the quadruples to ``output``; returns the summary."""
    k = num_source_chosen
    if k < 1:
        raise ValueError(f"--num-source-chosen must be >= 1, got {k}")
    merged: dict[str | int, tuple[SampleRow, Path, list[Response]]] = {}  # prompt_id -> first row, its file
    for path in map(Path, sources):
        for row in read_sample_rows(path, need_model=True, need_score=True):
            if row.prompt_id in merged:
                first, first_path, responses = merged[row.prompt_id]
                check_same_prompt(first, first_path, row, path)
                responses.extend(row.responses)
            else:
                merged[row.prompt_id] = (row, path, list(row.responses))
    target_rows = {}
    for row in read_sample_rows(targets, need_prompt=False, need_score=True):
        if row.prompt_id in merged:
            first, first_path, _ = merged[row.prompt_id]
            check_same_prompt(first, first_path, row, targets)
        target_rows[row.prompt_id] = row

    summary = BuildSummary(num_source_chosen=k)
    out = []
    for pid, (first, _, source_responses) in merged.items():
        if pid not in target_rows:
            summary.skipped[NO_TARGET] += 1
            continue
        target_responses = list(target_rows[pid].responses)
        usable_sources = [r for r in source_responses if r.text.strip()]
        usable_targets = [r for r in target_responses if r.text.strip()]
        summary.blank += (
            len(source_responses) + len(target_responses) - len(usable_sources) - len(usable_targets)
        )
        extras = {key: v for key, v in first.row.items() if key not in ("prompt_id", "prompt", "responses")}
        row, why = quadruple(pid, first.row["prompt"], usable_sources, usable_targets, k, extras, keep_tied)
        if row is None:
            summary.skipped[why] += 1
            continue
        out.append(row)
        summary.add(row)
    summary.skipped[NO_SOURCE] += sum(pid not in merged for pid in target_rows)
    summary.skipped = +summary.skipped  # drop zero counts
    if not out:
        raise ValueError(f"no prompt kept, {output} not written ({'; '.join(str(summary).splitlines())})")
    write_jsonl(output, out)
    return summary
