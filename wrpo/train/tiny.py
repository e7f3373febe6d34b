"""The bundled tiny default: a word/char tokenizer, a 2-layer Llama config (and random-init models saved
from it) and arithmetic preference data.

Everything is built offline and deterministically. ``python -m wrpo.train.tiny`` rewrites ``SAMPLE_DATA``.
"""

from __future__ import annotations

import json
import pathlib
import random

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SAMPLE_DATA = pathlib.Path(__file__).parents[1] / "assets" / "sample_pref.jsonl"

# Training settings of the bundled tiny default (tiny model on SAMPLE_DATA, i.e. no --model, no --dataset):
# it learns in minutes on a CPU with these. Any flag or YAML field overrides them.
TINY_DEFAULTS = {
    "learning_rate": 2e-3,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "logging_steps": 10,
    "eval_rows": 60,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "beta": 0.1,
    "disable_tqdm": False,
}


def is_bundled_tiny(config) -> bool:
    """The tiny model on the bundled sample data: no --model, no --dataset."""
    return config.model == "tiny" and config.dataset is None


def tiny_defaults_note() -> str:
    """One line naming the bundled tiny default's own settings."""
    values = ", ".join(f"{k} {v}" for k, v in TINY_DEFAULTS.items())
    return f"bundled tiny default (no --model, no --dataset): its own settings apply unless set: {values}"


# ids 0..6 in this order: pad 0, bos 1, eos 2, unk 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Whole-word tokens; any other text falls back to one token per printable ASCII character (digits always).
_WORD_LIST = """
    What Which How Why When Where Who Is Are Can Do Does Please Compute Calculate Find Add Subtract Multiply
    The This That It So Yes No You We They Let First Then Now Here Sure Thanks Hello Answer Result
    the a an and or but if then so not no yes is are was were be been being am do does did done has have had
    can could will would should may might must shall of to in on at by for with from into onto over under
    about after before between than as up down out off again more most less least very too also just only
    what which who whom whose when where why how all any both each few many much some such other another
    same own this that these those there here it its you your we our they their he she his her him them me my
    i number numbers sum difference product total plus minus times divided equals equal answer answers result
    results question questions step steps first second third next last one two three four five six seven
    eight nine ten hundred thousand zero add adding added subtract subtracting subtracted multiply multiplying
    multiplied divide compute calculate find get gets got give gives make makes take takes know think see
    look use used say said tell let check checked carry carrying correct wrong right true false sure
    exactly simply helpful careful assistant tutor math arithmetic problem problems solve solved
    solution work working good great small large big little new old long short high low same different
    way ways thing things time times day year people world part place case point fact
"""
WORDS = tuple(_WORD_LIST.split())

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless word/char-level tokenizer (< 512 ids) with a chat template.

    Pre-tokens are the words of ``WORDS`` (whole words only) or single characters; each is one id
    (non-ASCII characters map to ``<unk>``). Decoding concatenates tokens, so decode(encode(s)) == s
    for ASCII text. Template: ``<s><|user|>\\n{content}</s><|assistant|>\\n{content}</s>``; the
    generation prompt is ``<|assistant|>\\n``. No special tokens are added outside the template.
    """
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    words = sorted(set(WORDS) - set(chars))
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *chars, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = r"\b(?:" + "|".join(sorted(words, key=len, reverse=True)) + r")\b|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def tiny_model_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer Llama (hidden 64, 4 heads, 2 kv heads, MLP 128, 512 positions), untied head."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def save_tiny_model(path: str | pathlib.Path, *, seed: int = 0, reward_model: bool = False) -> pathlib.Path:
    """Save a random-init tiny Llama (``tiny_model_config``, init seed ``seed``) and the tiny tokenizer.

    With ``reward_model=True`` a sequence classifier with one output instead: a stand-in reward model
    for ``wrpo data score`` whose scores mean nothing (for checking the plumbing offline).
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_model_config(len(tokenizer))
    if reward_model:
        config.num_labels = 1
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (LlamaForSequenceClassification if reward_model else LlamaForCausalLM)(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return pathlib.Path(path)


QUESTIONS = ("What is {q}?", "Compute {q}.", "Calculate {q}.", "What do you get for {q}?")
SYSTEM = "You are a careful math tutor."


def make_sample_rows(n: int, seed: int) -> list[dict]:
    """``n`` arithmetic preference rows in the released layout, deterministic for ``seed``.

    ``{"prompt": P, "chosen": [y_ws, y_wt], "rejected": [y_l]}``, responses as assistant messages;
    P cycles through a user message, a plain string and [system, user] messages. y_ws explains
    ("7 + 8 = 15. The answer is 15."), y_wt is the bare answer ("15"), y_l is a bare answer off by 1-3.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op = rng.choice("+-*")
        # small operands: a few hundred distinct problems, so held-out rows test learnt preferences
        if op == "*":
            a, b = rng.randint(2, 6), rng.randint(2, 6)
        else:
            a, b = sorted((rng.randint(0, 12), rng.randint(0, 12)), reverse=op == "-")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = answer + rng.choice((-3, -2, -1, 1, 2, 3))
        question = rng.choice(QUESTIONS).format(q=f"{a} {op} {b}")
        rejected = str(wrong)
        user = {"role": "user", "content": question}
        prompt = (user, question, [{"role": "system", "content": SYSTEM}, user])[i % 3]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [
                    {"role": "assistant", "content": f"{a} {op} {b} = {answer}. The answer is {answer}."},
                    {"role": "assistant", "content": str(answer)},
                ],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def write_sample_data(path: str | pathlib.Path = SAMPLE_DATA, n: int = 600, seed: int = 0) -> pathlib.Path:
    """Write ``make_sample_rows(n, seed)`` as JSONL to ``path``; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in make_sample_rows(n, seed)), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_sample_data())
