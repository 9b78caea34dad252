"""End to end: a merged small Llama, written as GGUF, runs in llama.cpp with transformers' logits.

A tiny LlamaForCausalLM is trained with transformers for a few seconds (so that its logits are peaked),
two fine-tunes are made from it, and they are merged by llm_merge twice: to safetensors (loaded back
by transformers: the reference) and to GGUF (loaded by llama.cpp through llama-cpp-python). The logits
of every position of several prompts agree closely in f32 and f16; q8_0 picks the same next token.

Skipped unless torch, transformers and llama-cpp-python are installed (see README: "Checking a GGUF
file in llama.cpp").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf_helpers import write_bpe_tokenizer
from llm_merge.cli.merge import main

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

VOCAB, ADDED = 300, [(272, "<|begin|>", True), (273, "<|end|>", True)]
PROMPTS = [[5, 17, 29], [40, 41, 42, 43, 44, 45, 46], [200, 13, 99, 250, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
           [120], [77, 77, 77, 77], [271, 0, 150, 60, 33, 90], [8, 108, 208, 18, 118, 218, 28, 128]]


def next_token(tokens: torch.Tensor) -> torch.Tensor:
    """The rule the model learns: a fixed permutation of the byte tokens."""
    return (tokens * 37 + 11) % 256


def train_llama(directory: Path) -> None:
    """A 2-layer Llama (GQA, 4 heads) trained for 60 steps on ``next_token``, saved in float32."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=272, eos_token_id=273, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        start = torch.randint(0, 256, (16, 1))
        sequence = [start]
        for _ in range(15):
            sequence.append(next_token(sequence[-1]))
        ids = torch.cat(sequence, dim=1)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    write_bpe_tokenizer(directory, ADDED)


def fine_tune(base: Path, directory: Path, seed: int) -> None:
    """The base plus a small random change of every weight."""
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    write_bpe_tokenizer(directory, ADDED)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(merged safetensors directory, {gguf_type: .gguf path})."""
    root = tmp_path_factory.mktemp("llama_cpp")
    train_llama(root / "base")
    fine_tune(root / "base", root / "ft1", 1)
    fine_tune(root / "base", root / "ft2", 2)
    args = ["--merge_method", "dare_ties", "--base_model_path", str(root / "base"), "--model_path_list",
            str(root / "ft1"), str(root / "ft2"), "--reserve_p", "0.5", "--quiet"]
    assert main(args + ["--output_path", str(root / "st")]) == 0
    files = {}
    for gguf_type in ("f32", "f16", "q8_0"):
        assert main(args + ["--output_path", str(root / gguf_type), "--output_format", "gguf", "--gguf_type", gguf_type]) == 0
        files[gguf_type] = root / gguf_type / "model.gguf"
    return root / "st", files


def transformers_logits(directory: Path) -> list[np.ndarray]:
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return [model(input_ids=torch.tensor([prompt])).logits[0].numpy() for prompt in PROMPTS]


def llama_cpp_logits(path: Path) -> list[np.ndarray]:
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    found = []
    for prompt in PROMPTS:
        model.reset()
        model.eval(prompt)
        found.append(np.array(model.scores[: len(prompt)], dtype=np.float32))
    return found


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 1e-3), ("f16", 5e-3)])
def test_logits_match_transformers(merged, gguf_type, tolerance):
    directory, files = merged
    want, got = transformers_logits(directory), llama_cpp_logits(files[gguf_type])
    worst = max(float(np.abs(w - g).max()) for w, g in zip(want, got))
    spread = max(float(np.abs(w).max()) for w in want)
    print(f"{gguf_type}: largest |logit difference| {worst:.2e}, largest |logit| {spread:.2f}")
    assert worst <= tolerance * spread
    assert all((w.argmax(-1) == g.argmax(-1)).all() for w, g in zip(want, got))


def test_q8_0_picks_the_same_next_token(merged):
    directory, files = merged
    want, got = transformers_logits(directory), llama_cpp_logits(files["q8_0"])
    print(f"q8_0: largest |logit difference| {max(float(np.abs(w - g).max()) for w, g in zip(want, got)):.2e}")
    assert [int(w[-1].argmax()) for w in want] == [int(g[-1].argmax()) for g in got]
    assert [int(w[-1].argmax()) for w in want] == [int(next_token(torch.tensor(p[-1]))) for p in PROMPTS]  # it learned


def test_tokenizer_matches(merged):
    """llama.cpp splits text into the same tokens as the tokenizer.json it came from."""
    directory, files = merged
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    model = llama_cpp.Llama(model_path=str(files["f32"]), n_ctx=256, vocab_only=True, verbose=False)
    for text in ("the cat sat on the mat", "Where is it? 42 rats, there!", "hello\nworld  in   the    air"):
        assert model.tokenize(text.encode(), add_bos=False) == tokenizer.encode(text)
