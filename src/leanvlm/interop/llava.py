"""Export a vanilla leanvlm model as a Hugging Face `LlavaForConditionalGeneration` checkpoint with its
`LlavaProcessor`, so plain transformers (and the engines that serve HF Llava) run it with the same outputs.

Only what Llava can represent is exported: a single-crop vanilla model with the 2-layer MLP connector, one encoder
hidden state, no token merging and no probes, trained with the tokenizer's chat template. Everything else is
refused with the reason, before anything is written.
"""

from __future__ import annotations

import copy
import os

import torch

from leanvlm.config import IMAGE_TOKEN
from leanvlm.decoders.vanilla import VanillaDecoder
from leanvlm.encoder import CLS_FIRST, ENCODER_TYPES

# Jinja put in front of the tokenizer's chat template: messages whose content is a list of parts ({"type": "image"}
# / {"type": "text", "text": ...}, as LlavaProcessor's callers write them) become strings with one `<image>` per image
# before the text, on a line of their own, which is how leanvlm trains and asks (`with_image_placeholders`).
PARTS_TO_TEXT = (
    "{%- set converted = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set converted.messages = converted.messages + [message] -%}"
    "{%- else -%}"
    "{%- set part = namespace(images='', texts=[]) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set part.images = part.images + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set part.texts = part.texts + [item['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = (part.images + '\\n' if part.images else '') + part.texts | join('\\n') -%}"
    "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': content}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = converted.messages -%}"
)


def select_strategy(config) -> str:
    """leanvlm's token selection as Llava's `vision_feature_select_strategy` ("default" drops token 0, "full" keeps
    all), or a ValueError when Llava has no equivalent."""
    vision_type = config.vision_config.model_type
    select = config.vision_feature_select
    if vision_type not in ENCODER_TYPES:  # Llava's processor counts prefix tokens only for these
        raise ValueError(f"a {vision_type} encoder: export supports SigLIP, CLIP and DINOv2, whose prefix tokens "
                         "(none, or one CLS) Llava's processor counts.")
    if select == "drop_first":
        return "default"
    if select == "full":
        return "full"
    return "default" if vision_type in CLS_FIRST else "full"


def refusal(model, processor) -> str | None:
    """Why `model` cannot become a Llava checkpoint, or None when it can."""
    config = model.config
    if config.decoder != "vanilla":
        return (f"a {config.decoder} model cannot be exported to Llava: no Hugging Face class represents its decoder "
                "(Llava runs every vision token through every layer, as leanvlm's vanilla does). Serve it with "
                "`leanvlm serve` or evaluate it with lmms-eval's leanvlm model.")
    if config.max_crops > 1:
        return (f"max_crops={config.max_crops}: leanvlm encodes a base view and sub-crops and puts a newline "
                "embedding after each crop, while LlavaNext merges the sub-crops into one grid with a newline after "
                "each row of it; the layouts differ, so no LlavaNext checkpoint gives this model's outputs.")
    if config.uses_image_newline:
        return "image_newline is on: Llava has no newline embedding after a single-crop image."
    if config.connector_type != "mlp2x_gelu":
        return f"connector_type={config.connector_type!r}: Llava's projector is the 2-layer MLP (mlp2x_gelu)."
    if config.tome_r:
        return f"tome_r={config.tome_r}: Llava runs the encoder without token merging."
    changed = VanillaDecoder.options_from(config).changed()
    if changed:
        return (f"{', '.join(changed)}: Llava runs every vision token through every layer in full, without frozen "
                "layers or redundancy probes.")
    if processor.template != "chat":
        return (f"the model was trained with the {processor.template!r} template; the export carries the "
                "tokenizer's chat template, so only models trained with template 'chat' keep their prompts.")
    if not getattr(processor.tokenizer, "chat_template", None):
        return "the tokenizer has no chat_template for the Llava processor to use."
    if processor.tokenizer_image_id >= model.get_input_embeddings().weight.shape[0]:
        return (f"the tokenizer's {IMAGE_TOKEN} id ({processor.tokenizer_image_id}) lies outside the model's "
                "embeddings, which Llava indexes with it.")
    try:
        select_strategy(config)
    except ValueError as exc:
        return str(exc)
    return None


def to_llava(model, processor):
    """The Llava model and processor with `model`'s weights (copied; same dtype) and prompts."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    problem = refusal(model, processor)
    if problem:
        raise ValueError(f"Cannot export to Llava: {problem}")
    config = model.config
    strategy = select_strategy(config)
    text_config = copy.deepcopy(config.text_config)
    text_config.vocab_size = model.get_input_embeddings().weight.shape[0]  # `<image>` may have added a row
    connector = model.decoder.connector
    llava_config = LlavaConfig(
        text_config=text_config.to_dict(), vision_config=config.vision_config.to_dict(),
        # Llava finds images by the id the tokenizer gives `<image>`; its own embedding row is never read
        image_token_id=processor.tokenizer_image_id,
        vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act=config.connector_act, multimodal_projector_bias=config.connector_bias,
    )
    dtype = model.get_input_embeddings().weight.dtype
    llava = LlavaForConditionalGeneration(llava_config).to(dtype).eval()
    llava.model.language_model.load_state_dict(model.language_model.model.state_dict())
    llava.lm_head.load_state_dict(model.language_model.lm_head.state_dict())
    llava.model.vision_tower.load_state_dict(model.vision_model.state_dict())
    llava.model.multi_modal_projector.load_state_dict(connector.state_dict())
    llava.generation_config = copy.deepcopy(model.generation_config)
    llava_processor = LlavaProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(config.vision_config.model_type in CLS_FIRST),
        image_token=IMAGE_TOKEN, chat_template=PARTS_TO_TEXT + processor.tokenizer.chat_template,
    )
    return llava, llava_processor


def export(model_dir: str, out: str) -> list[str]:
    """Write the Llava checkpoint and processor of the saved model in `model_dir` to `out`; returns the files."""
    from leanvlm.eval.exact_match import load_model

    model, processor = load_model(model_dir)
    llava, llava_processor = to_llava(model.to("cpu"), processor)
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():
        llava.save_pretrained(out)
    llava_processor.save_pretrained(out)
    return sorted(os.path.join(out, name) for name in os.listdir(out))
