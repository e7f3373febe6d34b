"""``wrpo data sample``: N responses per prompt from a local model with transformers' ``generate``.

Sampling as the paper's (top-p 0.95, temperature 0.8, no top-k), prompts under the model's chat
template, batched with left padding. Fine for small models; for large ones use a serving engine
(e.g. vLLM) and write the same rows yourself, one JSON object a line:

    {"prompt_id": ID, "prompt": P, "responses": [{"model": NAME, "text": T, "score": null}, ...]}

Several source models: run ``sample`` once per model (``--model-name`` tags its responses, default
the model directory's name) and give all the files to ``wrpo data build --sources``, which merges the
responses of each prompt_id. The input is any file of rows with ``prompt_id`` and ``prompt``
(``wrpo data prompts`` makes one; built or split data work too). Other keys of an input row (e.g. a
reference ``answer`` for ``wrpo data score --reward-fn``) are copied to its sample row, except the
response keys of preference data (``LAYOUT_KEYS``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, set_seed

from wrpo.data.construct.hf import batches, load_tokenizer, local_dir, pick_device
from wrpo.data.construct.jsonl import write_jsonl
from wrpo.data.construct.rows import SampleRow, read_sample_rows

# keys of sample rows and built data that describe responses, never copied from an input row
LAYOUT_KEYS = frozenset(
    (
        "responses",
        "chosen",
        "rejected",
        "source_chosen",
        "target_chosen",
        "source_models",
        "chosen_scores",
        "rejected_scores",
    )
)


def sample(
    model: str | Path,
    input_path: str | Path,
    output: str | Path | None = None,
    *,
    n: int = 5,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    model_name: str | None = None,
    seed: int = 0,
    device: str | None = None,
) -> tuple[Path, int]:
    """Writes one sample row per prompt of ``input_path`` to ``output`` (scores null; default
    ``samples-{name}.jsonl`` next to the input); returns (output, rows written).

    Deterministic for ``seed`` on a given machine. All rows are checked before the model is loaded."""
    if min(n, max_new_tokens, batch_size) < 1:
        raise ValueError(
            f"--n, --max-new-tokens, --batch-size must be >= 1, got {n}, {max_new_tokens}, {batch_size}"
        )
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need --temperature > 0 and 0 < --top-p <= 1, got {temperature} and {top_p}")
    rows = read_sample_rows(input_path, need_responses=False)
    path = local_dir(model, "--model")
    name = model_name or path.resolve().name
    output = Path(output) if output is not None else Path(input_path).parent / f"samples-{name}.jsonl"
    tokenizer = load_tokenizer(path, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    lm = lm.to(pick_device(device)).eval()
    set_seed(seed)
    options = {
        "do_sample": True,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": 0,
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": n,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return output, write_jsonl(output, _sampled_rows(lm, tokenizer, rows, name, batch_size, options))


@torch.inference_mode()
def _sampled_rows(
    lm, tokenizer, rows: list[SampleRow], name: str, batch_size: int, options: dict
) -> Iterator[dict]:
    n = options["num_return_sequences"]
    with tqdm(total=len(rows), desc=f"sampling {name}", unit="prompt") as bar:
        for batch in batches(rows, batch_size):
            texts = [
                tokenizer.apply_chat_template(list(r.messages), add_generation_prompt=True, tokenize=False)
                for r in batch
            ]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(lm.device)
            new_tokens = lm.generate(**enc, **options)[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, row in enumerate(batch):
                responses = [{"model": name, "text": t, "score": None} for t in texts[i * n : (i + 1) * n]]
                extras = {k: v for k, v in row.row.items() if k not in LAYOUT_KEYS}
                yield {
                    **extras,
                    "prompt_id": row.prompt_id,
                    "prompt": row.row["prompt"],
                    "responses": responses,
                }
            bar.update(len(batch))
