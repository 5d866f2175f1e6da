"""Quick start on tiny random parts (no download, a few seconds on a laptop CPU).

Builds `himix`, `proxyv` and `vanilla` VLMs from a Llama config and a SigLIP vision config, runs a batched prompt with
two images through the processor, generates, computes a training loss, reuses an encoded image for new prompts,
and round-trips the model through safetensors. Swap the configs for checkpoint directories to use real weights.
"""

import tempfile

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast, SiglipVisionConfig

from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor


def toy_tokenizer() -> PreTrainedTokenizerFast:
    corpus = ["What color is the square?", "How many circles are there?", "red blue green one two three"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def picture(kind: str) -> Image.Image:
    image = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(image)
    if kind == "square":
        draw.rectangle([20, 20, 70, 70], fill="red")
    else:
        for x in (10, 40, 70):
            draw.ellipse([x, 40, x + 16, 56], fill="blue")
    return image


def main() -> None:
    torch.manual_seed(0)
    tokenizer = toy_tokenizer()
    llm = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
    vision = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=16)
    decoders = {"himix": {}, "proxyv": {"proxyv_start_layer": 1, "proxyv_reduce_factor": 2}, "vanilla": {}}
    for decoder, options in decoders.items():
        model = LeanVLMForConditionalGeneration.from_parts(language_model=llm, vision_model=vision, decoder=decoder,
                                                           tokenizer=tokenizer, **options).eval()
        processor = LeanVLMProcessor.for_model(model, tokenizer)
        batch = processor(text=["<image>\nWhat color is the square?", "<image>\nHow many circles?"],
                          images=[picture("square"), picture("circles")])
        out = model.generate(**batch, max_new_tokens=5)
        answers = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss

        context = model.encode_images(batch["pixel_values"][:1])  # encode once ...
        questions = processor(text=["<image>\nWhat color?", "<image>\nHow many?"])
        reused = model.generate(input_ids=questions["input_ids"], attention_mask=questions["attention_mask"],
                                image_context=context[[0, 0]], max_new_tokens=3)  # ... ask twice
        reused_answers = processor.batch_decode(reused[:, questions["input_ids"].shape[1]:], skip_special_tokens=True)

        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            again = LeanVLMForConditionalGeneration.from_pretrained(directory).eval()
            same = torch.equal(again(**batch).logits, model(**batch).logits)
        print(f"{decoder:8s} answers (random weights) {answers}  loss {loss.item():.3f}  "
              f"answers from a reused image context {reused_answers}  reload identical: {same}")


if __name__ == "__main__":
    main()
