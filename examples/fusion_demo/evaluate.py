"""Greedy exact-match accuracy of a saved model on problems, per family (transformers ``generate``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_demo.tasks import Problem
from wrpo.data.construct.verifiers import final_number


@torch.inference_mode()
def greedy_answers(model_dir: str | Path, questions: list[str], *, batch_size: int = 128,
                   max_new_tokens: int = 64) -> list[str]:  # fmt: skip
    """The greedy completion of each question under the model's chat template, batched (left padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    for start in range(0, len(questions), batch_size):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )  # fmt: skip
            for q in questions[start : start + batch_size]
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        new = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1] :]  # fmt: skip
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def accuracy(model_dir: str | Path, problems: dict[str, list[Problem]]) -> dict:
    """{"accuracy": overall, "by_family": {family: accuracy}}: the final number equals the answer."""
    flat = [p for family in problems for p in problems[family]]
    answers = greedy_answers(model_dir, [p.question for p in flat])
    hits = defaultdict(list)
    for p, text in zip(flat, answers, strict=True):
        hits[p.family].append(final_number(text) == p.answer)
    by_family = {f: sum(h) / len(h) for f, h in hits.items()}
    return {"accuracy": sum(sum(h) for h in hits.values()) / len(flat), "by_family": by_family}
