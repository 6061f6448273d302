"""Which tensors form which part ("module") of a model, for ``modules:`` recipes.

mergekit describes a multi-part model (a vision-language model's text decoder, vision
tower and projector; an encoder-decoder's encoder and decoder) as named modules, and a
``modules:`` recipe merges each with its own models or slices. alloykit uses the same
module names for the same architectures (read from ``config.json``'s ``architectures``);
every other model is one module named ``default``.

A module here is the tensor-name prefixes it owns, the prefix its numbered layers sit
under, and the config keys that hold its layer count (set in the output when slices
change it). Prefixes are tried in the order listed: the first module that owns a name
gets it (a projector under ``visual.merger.`` before the vision tower's ``visual.``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from alloykit.roles import LAYER_COUNT_KEYS, split_layer


@dataclass(frozen=True)
class ModuleLayout:
    name: str
    #: tensor names starting with one of these belong to the module ("" owns every name)
    prefixes: tuple[str, ...] = ("",)
    #: the prefix before each layer's index, e.g. 'visual.blocks.'; None: the generic pattern of
    #: ``alloykit.roles.split_layer`` (single-module models); "": the module has no numbered layers
    layers: str | None = None
    #: config.json keys (dotted for nested configs) that hold the layer count
    count_keys: tuple[str, ...] = ()

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefixes)

    def layer_of(self, name: str) -> tuple[str, int, str] | None:
        """(prefix, index, rest) of a tensor in one of the module's numbered layers, else None."""
        if self.layers is None:
            return split_layer(name)
        if not self.layers or not name.startswith(self.layers):
            return None
        idx, _, rest = name[len(self.layers):].partition(".")
        return (self.layers, int(idx), rest) if idx.isdigit() and rest else None


DEFAULT = (ModuleLayout("default", count_keys=LAYER_COUNT_KEYS),)

_TEXT_KEYS = ("num_hidden_layers", "text_config.num_hidden_layers")


def _vlm(text: str, vision: str, vision_layers: str, projector: tuple[str, ...], vision_key: str,
         vision_name: str = "vision_tower", projector_layers: str = "") -> tuple[ModuleLayout, ...]:
    """A vision-language model whose text decoder lives under ``text`` (+ ``lm_head.``)."""
    return (
        ModuleLayout("multi_modal_projector", projector, projector_layers),
        ModuleLayout(vision_name, (vision,), vision_layers, (vision_key,)),
        ModuleLayout("text_decoder", (text, "lm_head.", "language_model.lm_head."), text + "layers.", _TEXT_KEYS),
    )


_QWEN_VL = _vlm("model.", "visual.", "visual.blocks.", ("visual.merger.",), "vision_config.depth")

#: mergekit's multi-module architectures, by config.json 'architectures' entry
MODULAR: dict[str, tuple[ModuleLayout, ...]] = {
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    **dict.fromkeys(
        ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
        _vlm("model.language_model.", "model.visual.", "model.visual.blocks.",
             ("model.visual.merger.", "model.visual.deepstack_merger_list."), "vision_config.depth",
             projector_layers="model.visual.deepstack_merger_list."),
    ),
    "Gemma3ForConditionalGeneration": _vlm("language_model.model.", "vision_tower.vision_model.",
                                           "vision_tower.vision_model.encoder.layers.", ("multi_modal_projector.",),
                                           "vision_config.num_hidden_layers"),
    "Mistral3ForConditionalGeneration": _vlm("language_model.model.", "vision_tower.", "vision_tower.transformer.layers.",
                                             ("multi_modal_projector.",), "vision_config.num_hidden_layers"),
    "Llama4ForConditionalGeneration": _vlm("language_model.model.", "vision_model.", "vision_model.model.layers.",
                                           ("multi_modal_projector.",), "vision_config.num_hidden_layers",
                                           vision_name="vision_model"),
    "T5ForConditionalGeneration": (
        ModuleLayout("encoder", ("encoder.",), "encoder.block.", ("num_layers",)),
        ModuleLayout("decoder", ("decoder.",), "decoder.block.", ("num_decoder_layers",)),
        ModuleLayout("shared", ("shared.", "lm_head."), ""),
    ),
    "WhisperForConditionalGeneration": (
        ModuleLayout("encoder", ("model.encoder.",), "model.encoder.layers.", ("encoder_layers",)),
        ModuleLayout("decoder", ("model.decoder.",), "model.decoder.layers.", ("decoder_layers",)),
    ),
}


def model_modules(config: dict | None) -> tuple[ModuleLayout, ...]:
    """The modules of a model, from its config.json (one 'default' module if not multi-part)."""
    archs = (config or {}).get("architectures") or []
    return MODULAR.get(archs[0], DEFAULT) if archs else DEFAULT


def owner(modules: Iterable[ModuleLayout], name: str) -> ModuleLayout | None:
    return next((m for m in modules if m.owns(name)), None)


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_key(config: dict, dotted: str, value) -> bool:
    """Set an existing (possibly nested) config key; False when the key is absent."""
    *path, last = dotted.split(".")
    node = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return False
    node[last] = value
    return True
