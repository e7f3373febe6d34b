"""``wrpo data score``: fill in the ``score`` of every response with a local reward model.

The reward model is a transformers sequence classifier with one output (``num_labels=1``, as reward
models trained with TRL's RewardTrainer); each response is scored as the conversation prompt + response
under the reward model's chat template, truncated to ``max_length`` tokens. Rows are sample rows
(``wrpo.data.construct.rows``) and need their prompt; other keys are kept. ``--reward-fn`` scores with a
Python function instead (``wrpo.data.construct.reward_fn``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification

from wrpo.data.construct.hf import batches, load_tokenizer, local_dir, pick_device
from wrpo.data.construct.jsonl import write_jsonl
from wrpo.data.construct.rows import read_sample_rows


def score(
    input_path: str | Path,
    reward_model: str | Path,
    output: str | Path | None = None,
    *,
    batch_size: int = 8,
    max_length: int = 4096,
    device: str | None = None,
) -> int:
    """Scores every response of ``input_path`` and writes the rows to ``output`` (default: in place).

    Returns the number of responses scored. All rows are checked before the model is loaded."""
    if min(batch_size, max_length) < 1:
        raise ValueError(f"--batch-size and --max-length must be >= 1, got {batch_size} and {max_length}")
    rows = read_sample_rows(input_path)
    path = local_dir(reward_model, "--reward-model")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.num_labels != 1:
        raise ValueError(f"--reward-model {path}: {config.num_labels} outputs, expected one (num_labels=1)")
    tokenizer = load_tokenizer(path, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype="auto", local_files_only=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    conversations = [
        [*row.messages, {"role": "assistant", "content": r.text}] for row in rows for r in row.responses
    ]
    rewards = reward_scores(
        model.to(pick_device(device)).eval(), tokenizer, conversations, batch_size, max_length
    )
    it = iter(rewards)
    scored = [
        {**row.row, "responses": [{**item, "score": next(it)} for item in row.row["responses"]]}
        for row in rows
    ]
    write_jsonl(output or input_path, scored)
    return len(rewards)


@torch.inference_mode()
def reward_scores(
    model, tokenizer, conversations: list[list[dict]], batch_size: int, max_length: int
) -> list[float]:
    """The reward model's output for each conversation, in order (fp32 values as Python floats)."""
    out: list[float] = []
    with tqdm(total=len(conversations), desc="scoring", unit="response") as bar:
        for batch in batches(conversations, batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in batch]
            enc = tokenizer(
                texts,
                add_special_tokens=False,
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(model.device)
            out += model(**enc).logits[:, 0].float().tolist()
            bar.update(len(batch))
    return out
