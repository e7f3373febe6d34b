"""The bundled tiny default: tokenizer, model config and sample data (wrpo.train.tiny)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from wrpo.data.preference import load_preference_data, tokenize_example
from wrpo.train.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SAMPLE_DATA,
    build_tiny_tokenizer,
    make_sample_rows,
    tiny_model_config,
    write_sample_data,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_tokenizer_is_small_and_has_the_special_tokens(tok):
    assert len(tok) < 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    for special in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id


@pytest.mark.parametrize("text", ["0123456789", "37 + 48 = 85.", "9081726354 - 12 * 7"])
def test_digits_are_one_token_each_and_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    digits = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digits == [c for c in text if c.isdigit()]
    assert tok.decode(ids) == text


def test_text_round_trips_with_word_and_char_tokens(tok):
    text = "What is the answer?\nThesis: zebras multiply, quickly!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert "answer" in tok.convert_ids_to_tokens(ids)  # whole word
    assert "Thesis" not in tok.convert_ids_to_tokens(ids)  # unknown word: characters


def test_chat_template_renders_turns(tok):
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert (
        tok.apply_chat_template(messages, tokenize=False)
        == "<s><|user|>\nWhat is 2 + 3?</s><|assistant|>\n5</s>"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nWhat is 2 + 3?</s><|assistant|>\n"


def test_tokenizer_saves_and_reloads_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Compute 12 * 7."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template
    assert again.eos_token_id == EOS_ID


def test_tiny_model_runs_forward_on_a_tokenized_sample(tok):
    config = tiny_model_config(len(tok))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (
        2,
        128,
        512,
    )
    assert not config.tie_word_embeddings
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ex = load_preference_data(SAMPLE_DATA)[0]
    group = tokenize_example(ex, tok)
    ids = torch.tensor([group.prompt_ids + group.responses[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_sample_rows_are_deterministic_and_correct():
    rows = make_sample_rows(60, seed=1)
    assert rows == make_sample_rows(60, seed=1)
    assert rows != make_sample_rows(60, seed=2)
    for row in rows:
        explained, answer = (m["content"] for m in row["chosen"])
        expr = explained.split(" = ")[0]
        assert int(answer) == eval(expr)  # noqa: S307 -- our own "a op b" strings
        assert explained == f"{expr} = {answer}. The answer is {answer}."
        assert row["rejected"][0]["content"] not in (answer, explained)


def test_bundled_sample_file_is_the_generated_one(tmp_path):
    assert SAMPLE_DATA.stat().st_size < 300_000
    assert write_sample_data(tmp_path / "s.jsonl").read_text() == SAMPLE_DATA.read_text()


def test_bundled_sample_loads_with_k3_and_mixes_prompt_forms(tok):
    examples = load_preference_data(SAMPLE_DATA, num_chosen=2)
    assert len(examples) == 600
    assert {len(ex.chosen) + len(ex.rejected) for ex in examples} == {3}
    forms = {type(json.loads(line)["prompt"]).__name__ for line in SAMPLE_DATA.read_text().splitlines()}
    assert forms == {"dict", "str", "list"}
    texts = [m["content"] for ex in examples[:30] for m in ex.prompt] + [
        t for ex in examples[:30] for t in ex.chosen
    ]
    assert all(tok.unk_token_id not in tok(t, add_special_tokens=False)["input_ids"] for t in texts)
