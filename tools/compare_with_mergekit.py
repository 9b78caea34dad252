#!/usr/bin/env python
"""Run the real mergekit and llm_merge on one recipe and compare every output tensor.

Usage:
    python tools/compare_with_mergekit.py RECIPE.yml [RECIPE.yml ...] --family DIR [--work WORKDIR] [--seeds N] [--table]

``DIR`` is a family made by ``tools/make_toy_models.py`` (``base/`` and ``ft1`` .. ``ftN``); the
placeholders BASE, MODEL_A, MODEL_B, MODEL_C in the recipe become ``base``, ``ft1``, ``ft2``, ``ft3``,
and FAMILY becomes ``DIR`` itself (for anything else in it: ``MODEL_A+FAMILY/lora_ft1``; mergekit then runs
with ``--lora-merge-cache`` in the work dir).
Both tools run as subprocesses (``--mergekit``, default ``mergekit-yaml``; a multi-document recipe runs
``mergekit-multi`` beside it and ``--intermediate_dir`` for llm_merge; ``--llm_merge``, default
``python tools/mergekit.py`` with this interpreter), so this script imports neither torch nor mergekit.
``tools/mergekit_recipes/`` holds the recipes of the README's parity table; ``--table`` prints one
Markdown row per recipe.

A recipe may carry its own tolerances in a comment line ``# compare: --max_bad_frac 1e-4 --atol 1e-5``
(with the reason beside it): they override the command line's for that recipe.

Tokenizers: when a recipe has a ``tokenizer`` section, ``tokenizer_source`` or ``chat_template``, both
tools write their tokenizer: the token sets, added-token flags, ``vocab_size`` and chat templates must
be equal, and vocabulary tensors (embeddings, lm_head) are compared row by row of the same token (mergekit
numbers new tokens in hash-set order, which changes from run to run); otherwise mergekit runs with
``--no-copy-tokenizer``.

Deterministic methods: per tensor, the max abs diff, that diff relative to max |mergekit|, and the
fraction of elements that differ by more than bf16 rounding (``|d| > 2**-7 * |mergekit| + atol``).
Any such element fails the run.

Random methods (dare_ties, dare_linear, della, della_linear, or ``--random``): the two outputs are
compared in distribution, via the task vector ``tv = output - base``: the fraction of nonzero
entries, its mean, and its L1 norm per element (mean |tv|), averaged over ``--seeds`` runs. A
statistic fails when the two tools differ by more than ``SIGMAS`` standard errors (from the element
count) plus a small relative slack.

Also fails on a missing/extra tensor, a shape or stored-dtype mismatch, a different
``num_hidden_layers`` in config.json, or either tool exiting non-zero. Exit status: 0 pass, 1 fail.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
PLACEHOLDERS = {"BASE": "base", "MODEL_A": "ft1", "MODEL_B": "ft2", "MODEL_C": "ft3", "FAMILY": "."}
TOKENIZER_KEYS = ("tokenizer", "tokenizer_source", "chat_template")
BF16_RTOL = 2.0 ** -7
SIGMAS = 6.0  # standard errors allowed for a random statistic
REL_SLACK = 0.02  # plus this fraction of the statistic's magnitude (e.g. rescale details)
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# ----------------------------------------------------------------------------- I/O
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, in their stored dtype; bf16 widened exactly to float32 (its
    stored dtype is in ``stored_dtypes``), so that neither this interpreter nor mergekit's needs ml_dtypes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        values = np.frombuffer(data[start:end], dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = (values.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else values
    return out


def stored_dtypes(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype string, from the headers of every shard."""
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        out.update({name: info["dtype"] for name, info in header.items() if name != "__metadata__"})
    return out


def read_model(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (every *.safetensors shard)."""
    tensors: dict[str, np.ndarray] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def num_layers(model_dir: Path) -> int | None:
    cfg = model_dir / "config.json"
    return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.exists() else None


# ----------------------------------------------------------------------------- running the tools
def substitute(text: str, family: Path) -> str:
    """Replace the BASE / MODEL_A / MODEL_B / MODEL_C / FAMILY placeholders with the family's paths."""
    for key, sub in PLACEHOLDERS.items():
        text = re.sub(rf"\b{key}\b", str((family / sub).resolve()), text)
    return text


@dataclass(frozen=True)
class Recipe:
    """One recipe file after substitution: its documents and what the comparison needs to know of them."""

    path: Path
    text: str
    documents: list[dict]

    @property
    def final(self) -> dict:
        """The document whose output is compared: the unnamed one, else the last."""
        return next((d for d in self.documents if "name" not in d), self.documents[-1])

    @property
    def method(self) -> str:
        return str(self.final.get("merge_method", ""))

    @property
    def multi(self) -> bool:
        return len(self.documents) > 1

    @property
    def random(self) -> bool:
        return any(str(d.get("merge_method", "")) in RANDOM_METHODS for d in self.documents)

    @property
    def lora(self) -> bool:
        """Whether a model reference folds an adapter (``MODEL+LORA``)."""
        return any("+" in ref for ref in model_references(self.documents))

    @property
    def tolerance_note(self) -> str:
        """The reason given beside a ``# compare:`` line, or ""."""
        lines = [line.split("#", 2)[2].strip() for line in self.text.splitlines()
                 if line.startswith("# compare:") and line.count("#") >= 2]
        return "; ".join(lines)

    @property
    def tokenizer(self) -> bool:
        return any(key in d for d in self.documents for key in TOKENIZER_KEYS)


def model_references(node: object) -> list[str]:
    """Every string a recipe gives where a model goes: base_model, model, tokenizer_source, tokenizer source."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("base_model", "model", "tokenizer_source", "source") and isinstance(value, str):
                found.append(value)
            else:
                found += model_references(value)
    elif isinstance(node, list):
        for item in node:
            found += model_references(item)
    return found


def load_recipe(path: Path, family: Path) -> Recipe:
    text = substitute(path.read_text(), family)
    return Recipe(path, text, [d for d in yaml.safe_load_all(text) if d])


def run_tool(name: str, cmd: list[str], out_dir: Path) -> None:
    """Run one tool; raise RuntimeError with the tail of its output when it fails."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{name} exited {proc.returncode}: {' '.join(cmd)}\n{tail}")


def mergekit_multi_command(mergekit_cmd: str) -> list[str]:
    """mergekit-multi beside the given mergekit-yaml (same directory or PATH)."""
    words = shlex.split(mergekit_cmd)
    words[0] = str(Path(words[0]).with_name("mergekit-multi")) if "/" in words[0] else "mergekit-multi"
    return words


def run_both(recipe: Recipe, recipe_path: Path, work: Path, seed: int, mergekit_cmd: str,
             llm_merge_cmd: str) -> tuple[Path, Path]:
    """Merge the recipe with both tools into WORK/mergekit_sSEED and WORK/llm_merge_sSEED."""
    mk_out, lm_out = work / f"mergekit_s{seed}", work / f"llm_merge_s{seed}"
    copy = [] if recipe.tokenizer else ["--no-copy-tokenizer"]
    lora_cache = ["--lora-merge-cache", str(work / "mergekit_lora_cache")] if recipe.lora else []
    common_mk = [*copy, *lora_cache, "--random-seed", str(seed), "--quiet"]
    if recipe.multi:
        for inter in (work / f"mergekit_inter_s{seed}", work / f"llm_merge_inter_s{seed}"):
            shutil.rmtree(inter, ignore_errors=True)
        mk_cmd = [*mergekit_multi_command(mergekit_cmd), str(recipe_path), "--out-path", str(mk_out),
                  "-I", str(work / f"mergekit_inter_s{seed}"), *common_mk]
        lm_extra = ["--intermediate_dir", str(work / f"llm_merge_inter_s{seed}")]
    else:
        mk_cmd = [*shlex.split(mergekit_cmd), str(recipe_path), str(mk_out), *common_mk]
        lm_extra = []
    errors = []
    for name, cmd, out in [
        ("mergekit", mk_cmd, mk_out),
        ("llm_merge", [*shlex.split(llm_merge_cmd), str(recipe_path), str(lm_out), "--overwrite",
                       "--seed", str(seed), "--quiet", *lm_extra], lm_out),
    ]:
        try:
            run_tool(name, cmd, out)
        except RuntimeError as exc:
            errors.append(str(exc))
    if errors:
        raise RuntimeError("\n".join(errors))
    return mk_out, lm_out


# ----------------------------------------------------------------------------- comparing
@dataclass
class Row:
    name: str
    ok: bool
    text: str


def compare_exact(name: str, exp: np.ndarray, got: np.ndarray, max_bad_frac: float = 0.0, atol: float = 1e-6) -> Row:
    """Deterministic comparison: max abs / rel diff and the fraction of elements beyond bf16 rounding,
    ``|got - exp| > 2**-7 * |exp| + atol * max|exp|``; the tensor passes when that fraction <= max_bad_frac."""
    e, g = exp.astype(np.float64), got.astype(np.float64)
    diff = np.abs(g - e)
    scale = float(np.abs(e).max()) if e.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    bad = diff > BF16_RTOL * np.abs(e) + atol * scale + 1e-30
    frac = float(bad.mean()) if bad.size else 0.0
    return Row(name, frac <= max_bad_frac, f"max_abs {max_abs:9.3e}  max_rel {rel:9.3e}  frac>bf16 {frac:8.2e}")


def stat_tol(a: np.ndarray, b: np.ndarray, estimate: float) -> float:
    """SIGMAS standard errors of the difference of the means of a and b, plus REL_SLACK * |estimate|."""
    return SIGMAS * np.sqrt((np.var(a) + np.var(b)) / max(a.size, 1)) + REL_SLACK * abs(estimate) + 1e-12


def compare_random(name: str, mk: list[np.ndarray], lm: list[np.ndarray], base: np.ndarray | None) -> Row:
    """Distributional comparison of the task vectors (output - base), pooled over all seeds."""
    if base is None or base.shape != mk[0].shape:
        return compare_exact(name, mk[0], lm[0])  # no base counterpart (e.g. renumbered layer): exact
    b = base.astype(np.float64)
    tvm = np.concatenate([(o.astype(np.float64) - b).ravel() for o in mk])
    tvl = np.concatenate([(o.astype(np.float64) - b).ravel() for o in lm])
    nz_m, nz_l = float(np.mean(tvm != 0)), float(np.mean(tvl != 0))
    l1_m, l1_l = float(np.abs(tvm).mean()), float(np.abs(tvl).mean())
    p, n = (nz_m + nz_l) / 2, tvm.size
    checks = [abs(nz_m - nz_l) <= SIGMAS * np.sqrt(2 * p * (1 - p) / n) + 1.0 / n,
              abs(tvm.mean() - tvl.mean()) <= stat_tol(tvm, tvl, 0.0) + REL_SLACK * l1_m,  # mean ~ 0: slack from L1
              abs(l1_m - l1_l) <= stat_tol(np.abs(tvm), np.abs(tvl), l1_m)]
    flags = "".join("." if c else "X" for c in checks)
    text = (f"nz {nz_m:.4f}/{nz_l:.4f}  mean {tvm.mean():+.3e}/{tvl.mean():+.3e}  "
            f"L1 {l1_m:.3e}/{l1_l:.3e}  [{flags}] (mergekit/llm_merge; flags: nz, mean, L1)")
    return Row(name, all(checks), text)


def tokenizer_vocab(model_dir: Path) -> dict[str, int] | None:
    """Token -> id of ``tokenizer.json`` (model vocabulary and added tokens), or None without one."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    out = {entry[0]: i for i, entry in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    out.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return out


def added_token_flags(model_dir: Path) -> dict[str, tuple]:
    """Added token -> its (special, normalized, lstrip, rstrip, single_word) flags in ``tokenizer.json``."""
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    keys = ("special", "normalized", "lstrip", "rstrip", "single_word")
    return {t["content"]: tuple(t.get(k) for k in keys) for t in data.get("added_tokens", [])}


def chat_template(model_dir: Path) -> str | None:
    """The chat template a transformers tokenizer would load: chat_template.jinja, else tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None


def vocab_size(model_dir: Path) -> int | None:
    config = model_dir / "config.json"
    return json.loads(config.read_text()).get("vocab_size") if config.exists() else None


def row_order(mk_dir: Path, lm_dir: Path) -> np.ndarray | None:
    """For each row of mergekit's vocabulary tensors, the row of llm_merge's with the same token (rows past
    the tokens, padding, map to themselves). New tokens' ids are an order mergekit draws from a hash set,
    so rows are compared by token, not by id. None without both tokenizers or with different token sets."""
    mk, lm = tokenizer_vocab(mk_dir), tokenizer_vocab(lm_dir)
    size = vocab_size(mk_dir)
    if mk is None or lm is None or set(mk) != set(lm) or size is None or size != vocab_size(lm_dir):
        return None
    order = np.arange(size)
    for token, i in mk.items():
        if i < size and lm[token] < size:
            order[i] = lm[token]
    return order


def compare_tokenizers(mk_dir: Path, lm_dir: Path) -> list[Row]:
    """The same tokens (ids may differ only where mergekit numbers new tokens in hash-set order), added-token
    flags, vocab_size and chat template."""
    mk, lm = tokenizer_vocab(mk_dir), tokenizer_vocab(lm_dir)
    if mk is None or lm is None:
        rows = [Row("tokenizer.json", mk is None and lm is None,
                    f"written by {'neither' if mk is None and lm is None else 'mergekit only' if lm is None else 'llm_merge only'}")]
    else:
        only = sorted(set(mk) ^ set(lm))
        moved = sum(mk[t] != lm[t] for t in set(mk) & set(lm))
        flags_differ = sorted(t for t, f in added_token_flags(mk_dir).items() if added_token_flags(lm_dir).get(t, f) != f)
        text = f"{len(mk)} tokens (mergekit) vs {len(lm)} (llm_merge), {moved} at other ids"
        if only:
            text += f"; {len(only)} in one only, e.g. {only[:3]}"
        if flags_differ:
            text += f"; added-token flags differ for {flags_differ[:3]}"
        rows = [Row("tokenizer.json", not only and not flags_differ, text)]
        rows.append(Row("config.json vocab_size", vocab_size(mk_dir) == vocab_size(lm_dir),
                        f"{vocab_size(mk_dir)} (mergekit) vs {vocab_size(lm_dir)} (llm_merge)"))
    mk_t, lm_t = chat_template(mk_dir), chat_template(lm_dir)
    if mk_t == lm_t:
        rows.append(Row("chat_template", True, "equal text"))
    else:
        mk_r, lm_r = rendered(mk_t), rendered(lm_t)
        same = mk_r is not None and mk_r == lm_r
        rows.append(Row("chat_template", same, "other text, same rendering of a sample chat" if same else
                        f"{len(mk_t or '')} chars (mergekit) vs {len(lm_t or '')} (llm_merge), renderings differ"))
    return rows


SAMPLE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2+2?"}]


def rendered(template: str | None) -> tuple[str, ...] | None:
    """A sample chat rendered as transformers renders chat templates (jinja2, trim_blocks and lstrip_blocks),
    with and without the generation prompt; None without a template or without jinja2."""
    try:
        import jinja2
    except ImportError:
        return None
    if template is None:
        return None
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    compiled = env.from_string(template)
    return tuple(compiled.render(messages=SAMPLE_CHAT, add_generation_prompt=g, bos_token="<s>", eos_token="</s>")
                 for g in (False, True))


def compare_outputs(mk_dirs: list[Path], lm_dirs: list[Path], base_dir: Path | None, random: bool,
                    max_bad_frac: float = 0.0, atol: float = 1e-6, by_token: bool = False) -> list[Row]:
    """Compare every tensor of the two tools' outputs (first seed, or all seeds when random); with
    ``by_token``, vocabulary tensors (vocab_size rows) row by row of the same token."""
    mk = [read_model(d) for d in mk_dirs]
    lm = [read_model(d) for d in lm_dirs]
    order = row_order(mk_dirs[0], lm_dirs[0]) if by_token else None
    if order is not None:
        lm = [{name: t[order] if t.ndim and t.shape[0] == order.size else t for name, t in m.items()} for m in lm]
    base = read_model(base_dir) if (random and base_dir is not None) else {}
    mk_dtypes, lm_dtypes = stored_dtypes(mk_dirs[0]), stored_dtypes(lm_dirs[0])
    rows = []
    for name in sorted(set(mk[0]) | set(lm[0])):
        if name not in lm[0] or name not in mk[0]:
            rows.append(Row(name, False, f"only in {'mergekit' if name in mk[0] else 'llm_merge'}"))
            continue
        e, g = mk[0][name], lm[0][name]
        if e.shape != g.shape:
            rows.append(Row(name, False, f"shape {e.shape} (mergekit) vs {g.shape} (llm_merge)"))
            continue
        row = (compare_random(name, [m[name] for m in mk], [m[name] for m in lm], base.get(name)) if random
               else compare_exact(name, e, g, max_bad_frac, atol))
        if mk_dtypes[name] != lm_dtypes[name]:
            row = Row(name, False, f"{row.text}  DTYPE {mk_dtypes[name]} (mergekit) vs {lm_dtypes[name]} (llm_merge)")
        rows.append(row)
    nl_mk, nl_lm = num_layers(mk_dirs[0]), num_layers(lm_dirs[0])
    if nl_mk != nl_lm:
        rows.append(Row("config.json", False, f"num_hidden_layers {nl_mk} (mergekit) vs {nl_lm} (llm_merge)"))
    return rows


def recipe_args(recipe: Recipe, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the recipe's own ``# compare: --flag value ...`` tolerances applied."""
    tolerances = argparse.ArgumentParser()
    tolerances.add_argument("--max_bad_frac", type=float, default=args.max_bad_frac)
    tolerances.add_argument("--atol", type=float, default=args.atol)
    tolerances.add_argument("--seeds", type=int, default=args.seeds)
    words = [w for line in recipe.text.splitlines() if line.startswith("# compare:")
             for w in shlex.split(line.split(":", 1)[1], comments=True)]
    return argparse.Namespace(**{**vars(args), **vars(tolerances.parse_args(words))})


def compare_recipe(recipe: Recipe, args: argparse.Namespace) -> tuple[bool, str, list[Row]]:
    """Run both tools on one recipe and compare: (passed, summary line, rows)."""
    args = recipe_args(recipe, args)
    base = recipe.final.get("base_model")
    base_dir = Path(base) if base and Path(base).is_dir() else None  # not a document name or model+lora
    random = args.random or recipe.random
    work = (args.work / recipe.path.stem) if args.work else Path(tempfile.mkdtemp(prefix="mkcompare_"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds if random else 1))
    try:
        recipe_path = work / recipe.path.name
        recipe_path.write_text(recipe.text)
        try:
            outs = [run_both(recipe, recipe_path, work, s, args.mergekit, args.llm_merge) for s in seeds]
        except RuntimeError as exc:
            return False, f"{recipe.path.name}: ERROR\n{exc}", []
        rows = compare_outputs([o[0] for o in outs], [o[1] for o in outs], base_dir, random,
                               args.max_bad_frac, args.atol, by_token=recipe.tokenizer)
        if recipe.tokenizer:
            rows += compare_tokenizers(*outs[0])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    n_bad = sum(not r.ok for r in rows)
    kind = f"random ({len(seeds)} seed(s))" if random else "deterministic"
    summary = ""
    if not random:
        rels = [float(m.group(1)) for r in rows if (m := re.search(r"max_rel\s+(\S+)", r.text))]
        summary = f", max rel diff {max(rels, default=0.0):.3e}"
    line = (f"{recipe.path.name}: {recipe.method} {kind}: {'PASS' if n_bad == 0 else 'FAIL'} "
            f"({n_bad}/{len(rows)} failing{summary})")
    return n_bad == 0, line, rows


def table_row(recipe: Recipe, ok: bool, line: str, rows: list[Row]) -> str:
    """One Markdown row: recipe, method, what else it uses, result and the largest difference."""
    uses = [word for word, present in (("multi-document", recipe.multi), ("slices", "slices" in recipe.final),
                                       ("tokenizer", recipe.tokenizer),
                                       ("model+lora", recipe.lora)) if present]
    rels = [float(m.group(1)) for r in rows if (m := re.search(r"max_rel\s+(\S+)", r.text))]
    result = "pass" if ok else "FAIL" if rows else "ERROR"
    diff = "in distribution" if recipe.random else f"{max(rels, default=0.0):.1e}"
    return (f"| {recipe.path.parent.name}/{recipe.path.name} | {recipe.method} | {', '.join(uses) or '-'} | {result} "
            f"| {diff} | {recipe.tolerance_note or '-'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", type=Path, nargs="+", metavar="recipe",
                   help="mergekit YAML recipe(s) (may use BASE / MODEL_A / MODEL_B / MODEL_C / FAMILY)")
    p.add_argument("--family", type=Path, required=True, help="toy family dir (base/, ft1/, ft2/, ...)")
    p.add_argument("--work", type=Path, help="work dir for the recipes and both outputs (default: temp dirs, removed)")
    p.add_argument("--seeds", type=int, default=1, help="runs per tool for random methods (default: 1)")
    p.add_argument("--random", action="store_true", help="compare in distribution even if the method is not random")
    p.add_argument("--mergekit", default="mergekit-yaml", help="mergekit command (default: mergekit-yaml)")
    p.add_argument("--llm_merge", default=f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tools' / 'mergekit.py'))}",
                   help="llm_merge command (default: python tools/mergekit.py)")
    p.add_argument("--atol", type=float, default=1e-6,
                   help="deterministic: absolute tolerance as a fraction of max|mergekit| per tensor (default: 1e-6); "
                        "with dtype bfloat16 mergekit rounds the inputs to bf16 and computes in it, 2**-7 absorbs that")
    p.add_argument("--max_bad_frac", type=float, default=0.0,
                   help="deterministic: fraction of elements per tensor allowed beyond bf16 rounding (default: 0); "
                        "magnitude top-k methods (ties, breadcrumbs) on bf16 checkpoints break exact ties in "
                        "|delta| in an implementation-defined order")
    p.add_argument("--failures_only", action="store_true", help="print only the failing tensors")
    p.add_argument("--table", action="store_true", help="print one Markdown table row per recipe instead of tensors")
    args = p.parse_args(argv)

    failed = 0
    if args.table:
        print("| recipe | method | uses | result | max rel diff | allowed difference |\n|---|---|---|---|---|---|")
    for path in args.recipes:
        recipe = load_recipe(path, args.family)
        ok, line, rows = compare_recipe(recipe, args)
        failed += not ok
        if args.table:
            print(table_row(recipe, ok, line, rows), flush=True)
            if not ok:
                print(line, file=sys.stderr)
            continue
        width = max((len(r.name) for r in rows), default=0)
        for r in rows:
            if not (r.ok and args.failures_only):
                print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.text}")
        print(line, flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
