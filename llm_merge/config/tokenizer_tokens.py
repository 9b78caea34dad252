"""``tokenizer_tokens``: per-token embedding sources of mergekit's ``tokenizer: tokens:`` section, checked.

The value is ``{token: {"source": SOURCE, "force": bool}}``, SOURCE one of
  * absent / null: the token is added to the output vocabulary; its rows follow the default rules;
  * a model directory: that model's row for the token;
  * ``{"kind": "zero"}``: a zero row;
  * ``{"kind": "model_token", "model": DIR, "token_id": N}`` or ``{..., "token": "text"}``: row N of that model's
    tensor, or the row of another token in that model's own vocabulary.
``force``: every model takes this row, even the models that have the token (default: only those that lack it).
"""

from __future__ import annotations

from typing import Any, Callable

from llm_merge.errors import ConfigError

_ENTRY_KEYS = {"source", "force"}
_MODEL_TOKEN_KEYS = {"kind", "model", "token_id", "token"}


def checked_tokens(tokens: Any, where: str = "tokenizer_tokens",
                   resolve_model: Callable[[Any, str], str] = lambda ref, where: ref) -> dict[str, dict]:
    """``tokens`` in the canonical form above (model references through ``resolve_model``); ConfigError naming
    ``where`` and the token otherwise."""
    if not isinstance(tokens, dict):
        raise ConfigError(f"{where}: expected a mapping {{token: {{source: ..., force: ...}}}}, got {tokens!r}")
    out = {}
    for token, entry in tokens.items():
        at = f"{where}[{token!r}]"
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{at}: a token is a non-empty string")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - _ENTRY_KEYS:
            bad = sorted(set(entry) - _ENTRY_KEYS) if isinstance(entry, dict) else [repr(entry)]
            raise ConfigError(f"{at}: expected {{source: ..., force: true|false}}; unsupported {', '.join(map(str, bad))}")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise ConfigError(f"{at}.force: expected true or false, got {force!r}")
        out[token] = {"source": _source(entry.get("source"), f"{at}.source", resolve_model), "force": force}
    return out


def _source(source: Any, where: str, resolve_model) -> Any:
    if source is None:
        return None
    if isinstance(source, dict):
        kind = source.get("kind")
        if kind == "zero" and set(source) == {"kind"}:
            return {"kind": "zero"}
        if kind == "model_token" and not set(source) - _MODEL_TOKEN_KEYS:
            has_id, has_token = source.get("token_id") is not None, source.get("token") is not None
            if has_id == has_token:
                raise ConfigError(f"{where}: give exactly one of token_id and token")
            if has_id and (isinstance(source["token_id"], bool) or not isinstance(source["token_id"], int) or source["token_id"] < 0):
                raise ConfigError(f"{where}.token_id: expected an integer >= 0, got {source['token_id']!r}")
            if has_token and not isinstance(source["token"], str):
                raise ConfigError(f"{where}.token: expected a string, got {source['token']!r}")
            key = ("token_id", source["token_id"]) if has_id else ("token", source["token"])
            return {"kind": "model_token", "model": resolve_model(source.get("model"), f"{where}.model"), key[0]: key[1]}
        raise ConfigError(f"{where}: expected a model, {{kind: zero}} or {{kind: model_token, model: ..., token_id | token: ...}}, "
                          f"got {source!r}")
    return resolve_model(source, where)


def check_tokenizer_options(cfg) -> None:
    """``tokenizer_tokens``, ``pad_to_multiple_of`` and ``chat_template`` of a MergeConfig; ConfigError naming the option."""
    from llm_merge.config import chat_templates

    mergekit_vocab = cfg.tokenizer_source is not None and cfg.semantics == "mergekit"
    for option in ("tokenizer_tokens", "pad_to_multiple_of"):
        if getattr(cfg, option) is not None and not mergekit_vocab:
            raise ConfigError(f"--{option}: needs --tokenizer_source and --semantics mergekit (mergekit's tokenizer merge); "
                              f"got tokenizer_source {cfg.tokenizer_source!r}, semantics {cfg.semantics!r}")
    if cfg.tokenizer_tokens is not None:
        checked_tokens(cfg.tokenizer_tokens)
    multiple = cfg.pad_to_multiple_of
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ConfigError(f"--pad_to_multiple_of: {multiple!r} must be an integer >= 1")
    template = cfg.chat_template
    if template is None or template == "auto":
        return
    if chat_templates.looks_like_name(template):
        if template not in chat_templates.names():
            raise ConfigError(f"--chat_template: {template!r} is not a built-in template name (valid: auto, "
                              f"{', '.join(chat_templates.names())}) nor a Jinja template text")
    elif len(template) < chat_templates.LITERAL_MIN_CHARS:
        raise ConfigError(f"--chat_template: {template!r} is too short for a Jinja template text "
                          f"(< {chat_templates.LITERAL_MIN_CHARS} characters)")
