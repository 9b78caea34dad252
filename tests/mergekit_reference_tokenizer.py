"""NumPy port of mergekit 0.1.5's ``tokenizer/embed.py`` (PermutedVocabulary.execute): each model's tensor on the
output vocabulary. ``vocabs``: model -> token -> id (its own); ``vocab``: output token -> id; ``tokens``: mergekit's
``tokenizer.tokens`` with sources as model keys / {"kind": "zero"} / {"kind": "model_token", ...}."""

import numpy as np


def permuted(tensors, vocabs, vocab, base, tokens=None, pad_to_multiple_of=None):
    models = list(tensors)
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size = (size // pad_to_multiple_of + 1) * pad_to_multiple_of
    perm = {m: {i: vocabs[m].get(t, -1) if vocabs[m].get(t, -1) < len(tensors[m]) else -1 for t, i in vocab.items()} for m in models}
    configs = dict(tokens or {})
    average = set()
    for t, i in vocab.items():  # assign_embedding_sources
        if t in configs:
            continue
        has = [perm[m][i] >= 0 for m in models]
        if sum(has) == 1:
            configs[t] = {"source": models[has.index(True)], "force": False}
        elif sum(has) == 0:
            configs[t] = {"source": {"kind": "zero"}, "force": False}
        elif base in models and perm[base][i] >= 0:
            configs[t] = {"source": base, "force": False}
        else:
            average.add(t)
    shape = tensors[models[0]].shape[1:]
    defaults = {}
    for t, i in vocab.items():
        c = configs.get(t)
        if not (c and c["force"]) and all(perm[m][i] >= 0 for m in models):
            continue
        if t in average:
            rows = [tensors[m][perm[m][i]] for m in models if perm[m][i] >= 0]
            defaults[t] = np.sum(rows, axis=0) / len(rows)
            continue
        src = c["source"]
        if isinstance(src, dict) and src["kind"] == "zero":
            defaults[t] = np.zeros(shape, np.float32)
        elif isinstance(src, dict):
            row = src["token_id"] if "token_id" in src else vocabs[src["model"]][src["token"]]
            defaults[t] = tensors[src["model"]][row]
        else:
            defaults[t] = tensors[src][perm[src][i]]
    out = {}
    for m in models:
        new = np.zeros((size, *shape), np.float32)
        for t, i in vocab.items():
            force = configs.get(t, {}).get("force", False) if t in (tokens or {}) else False
            if perm[m][i] >= 0 and not force:
                new[i] = tensors[m][perm[m][i]]
            elif t in defaults:
                new[i] = defaults[t]
        if size > len(vocab):
            new[len(vocab):] = new[: len(vocab)].mean(axis=0)
        out[m] = new
    return out
