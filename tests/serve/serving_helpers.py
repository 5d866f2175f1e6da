"""Shared by the serving tests: a tiny model and processor, test images, chat request bodies, and the answer
`model.generate` gives a request alone (the reference every served answer is checked against)."""

import base64
import io

import numpy as np
import torch
from PIL import Image
from tiny import bpe_tokenizer, build

from leanvlm import LeanVLMProcessor
from leanvlm.data.templates import generation_prompt
from leanvlm.eval.exact_match import encode_prompts
from leanvlm.serve.server import ServerSettings, build_app

MODEL = "tiny"
QUESTION = "What color is the square?"


def png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(image: bytes | None = None, text: str = QUESTION, **fields) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
            **fields}


def tiny_parts(decoder="himix"):
    model = build(decoder)
    return model, LeanVLMProcessor.for_model(model, bpe_tokenizer())


def app_for(model, processor, **changes):
    return build_app(MODEL, ServerSettings(model_name=MODEL, **changes), model, processor)


def expected_answer(model, processor, image: bytes | None, max_new_tokens=6, text=QUESTION) -> str:
    """What `model.generate` answers alone to the prompt `leanvlm eval` would ask (the image before the text)."""
    messages = [{"role": "user", "content": ("<image>\n" if image else "") + text}]
    ids = encode_prompts(processor, [generation_prompt(messages, processor.template, processor.tokenizer)])[0][0]
    ids = ids.tolist()
    extra = {}
    if image is not None:
        extra["pixel_values"], extra["image_crops"] = processor.preprocess_images([Image.open(io.BytesIO(image))
                                                                                   .convert("RGB")])
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, **extra)[0, len(ids):]
    return processor.decode(out, skip_special_tokens=True)
