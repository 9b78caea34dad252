"""The base model's hidden states of the prompts at every layer, one decoder layer in memory at a time.

The only module that imports torch and transformers (the ``[moe]`` extra), for ``gate_mode: hidden``. The
prompts' embedding rows are read from the base (only those rows); then for each layer in turn one decoder
layer of the base's own transformers class is built on the meta device, given that layer's tensors (read
as float32) and run on every prompt, and dropped. Only the prompts' activations stay between layers, so
memory is one layer in float32 plus the activations, whatever the model's depth.

The prompts run as one batch padded on the right, causally masked, each from position 0: a prompt's tokens
never see the padding after them, so each gets what transformers computes for it alone (and in mergekit's
left-padded batch: rotary embeddings depend on relative positions only). The hidden state
recorded for layer ``i`` is the input of decoder layer ``i`` (``output_hidden_states[i]``, the embeddings
for layer 0), as mergekit-moe's gates use them.
"""

from __future__ import annotations

import importlib
import logging
from typing import Sequence

import numpy as np

from llm_merge.errors import ConfigError, MergeError
from llm_merge.io.checkpoint import Checkpoint
from llm_merge.io.reader import TensorReader
from llm_merge.io.safetensors_format import TensorInfo

log = logging.getLogger(__name__)

#: Dense model types whose transformers decoder layer runs here: model_type -> class prefix.
LAYER_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_EMBED = "model.embed_tokens.weight"


def import_torch(need: str) -> tuple:
    """(torch, transformers), or ConfigError naming the extra that installs them."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError(f"{need} runs the base model: pip install 'llm_merge[moe]' (torch and transformers; "
                          "a CPU build of torch is enough)") from None
    return torch, transformers


def check_runnable(base_config: dict, need: str) -> None:
    """ConfigError before any work when the hidden states cannot be computed (no torch, an unknown layer class)."""
    import_torch(need)
    if base_config.get("model_type") not in LAYER_CLASSES:
        raise ConfigError(f"{need}: runs decoder layers of {', '.join(LAYER_CLASSES)} models; the base is "
                          f"{base_config.get('model_type')!r}")


def prompt_hidden_states(base: Checkpoint, base_config: dict, prompts: Sequence[Sequence[int]], layers: int,
                         last_token: bool) -> np.ndarray:
    """[prompts, layers, hidden] float32: each prompt's hidden state at the input of every decoder layer, of its
    last token (``last_token``) or the mean over its tokens."""
    torch, transformers = import_torch("gate_mode hidden")
    model_type = base_config["model_type"]
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in base_config.items() if k != "model_type"})
    config._attn_implementation = "eager"  # the explicit causal mask below
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    layer_class = getattr(modeling, f"{LAYER_CLASSES[model_type]}DecoderLayer")
    rotary = getattr(modeling, f"{LAYER_CLASSES[model_type]}RotaryEmbedding")(config=config)
    lengths = [len(ids) for ids in prompts]
    reader = TensorReader()
    try:
        states = torch.zeros(len(prompts), max(lengths), base.tensors[_EMBED].shape[1])
        for index, ids in enumerate(prompts):
            states[index, :len(ids)] = torch.from_numpy(_rows(reader, base.tensors[_EMBED], ids))
        mask, positions, rope = _positional(torch, rotary, len(prompts), max(lengths))
        found = np.empty((len(prompts), layers, states.shape[-1]), dtype=np.float32)
        for layer in range(layers):
            for index, length in enumerate(lengths):
                found[index, layer] = (states[index, length - 1] if last_token else states[index, :length].mean(dim=0)).numpy()
            if layer == layers - 1:
                break
            module = _load_layer(torch, layer_class, config, layer, base, reader)
            with torch.no_grad():
                states = _first(module(states, attention_mask=mask, position_ids=positions, position_embeddings=rope))
            del module
            log.debug("hidden states: layer %d of %d", layer + 1, layers)
    finally:
        reader.close()
    if not np.isfinite(found).all():
        raise MergeError(f"{base.path}: the hidden states of the prompts are not finite; the base model overflows")
    return found


def _rows(reader: TensorReader, info: TensorInfo, ids: Sequence[int]) -> np.ndarray:
    """The embedding rows of ``ids`` as float32 [len(ids), hidden] (each row read on its own)."""
    hidden = info.shape[1]
    out = np.empty((len(ids), hidden), dtype=np.float32)
    for row, token in enumerate(ids):
        reader.read_f32(info, token * hidden, out[row])
    return out


def _positional(torch, rotary, count: int, length: int) -> tuple:
    """(causal additive mask [1, 1, T, T], position ids [count, T], rotary (cos, sin)) of ``count`` prompts padded on
    the right to ``length`` tokens: causally masked, a prompt's tokens never see the padding after them."""
    mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    positions = torch.arange(length)[None].expand(count, length)
    with torch.no_grad():
        rope = rotary(torch.zeros(count, length, 1, dtype=torch.float32), positions)
    return mask, positions, rope


def _load_layer(torch, layer_class, config, layer: int, base: Checkpoint, reader: TensorReader):
    """Decoder layer ``layer`` of the base with its own tensors in float32 (built on the meta device: no init)."""
    prefix = f"model.layers.{layer}."
    state = {}
    for name, info in base.tensors.items():
        if name.startswith(prefix) and not name.endswith("rotary_emb.inv_freq"):
            values = reader.read_f32(info, 0, np.empty(info.numel, dtype=np.float32))
            state[name[len(prefix):]] = torch.from_numpy(values.reshape(info.shape))
    with torch.device("meta"):
        module = layer_class(config, layer)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise MergeError(f"{base.path}: layer {layer} does not fit transformers' {layer_class.__name__} "
                         f"({' '.join(str(exc).split())[:300]})") from None
    return module.eval()


def _first(output):
    """A decoder layer's hidden states (transformers 4 returns a tuple, 5 the tensor)."""
    return output[0] if isinstance(output, tuple) else output
