"""Conversation templates: a LLaVA-format conversation -> text segments, each marked as scored (assistant) or not.

- "chat": the tokenizer's own `chat_template`; assistant spans are found by rendering the conversation turn by turn.
- "plain": each human turn as context and each answer + end-of-sequence scored, with nothing between them and no
  system turn: alignment captions, and the demo's short answers at under half the chat template's tokens.
- "vicuna_v1": LLaVA-1.5's `USER: ... ASSISTANT: ...</s>` format with its system line.
"""

from __future__ import annotations

from leanvlm.config import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("chat", "plain", "vicuna_v1")


def with_image_placeholders(texts: list[str], images: int) -> str:
    """A message given as text parts and a number of images -> one content string: an `<image>` placeholder per
    image, all before the text and on a line of their own, as leanvlm's training data places them. Chat APIs (the
    OpenAI protocol, lmms-eval) carry images apart from the text, so this one rule makes them ask what training
    asked."""
    return IMAGE_TOKEN * images + ("\n" if images else "") + "\n".join(texts)


def to_messages(conversations: list[dict], where: str) -> list[dict]:
    """LLaVA turns ({"from", "value"}) -> chat messages ({"role", "content"}); unknown roles are an error."""
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: every turn needs 'from' and 'value', got {turn!r}.")
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"{where}: unknown role {turn['from']!r}; use one of {', '.join(ROLES)}.")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def segments(messages: list[dict], template: str, tokenizer) -> list[tuple[str, bool]]:
    """(text, scored) pieces whose concatenation is the rendered conversation."""
    eos = tokenizer.eos_token or ""
    if template == "plain":
        return [(m["content"] + (eos if m["role"] == "assistant" else ""), m["role"] == "assistant")
                for m in messages if m["role"] != "system"]
    if template == "vicuna_v1":
        system = next((m["content"] for m in messages if m["role"] == "system"), VICUNA_SYSTEM)
        pieces = [(system + " ", False)]
        for m in messages:
            if m["role"] == "user":
                pieces.append((f"USER: {m['content']} ASSISTANT:", False))
            elif m["role"] == "assistant":
                pieces.append((f" {m['content']}{eos}", True))
        return pieces
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("The tokenizer has no chat_template; use template='vicuna_v1' or 'plain'.")
        pieces, done = [], ""
        for index, message in enumerate(messages):
            upto = messages[: index + 1]
            if message["role"] == "assistant":
                prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
                pieces.append((prompt[len(done):], False))
                done = prompt
            text = tokenizer.apply_chat_template(upto, tokenize=False)
            if not text.startswith(done):
                raise ValueError("The tokenizer's chat_template does not render turn by turn as prefixes; use "
                                 "template='vicuna_v1'.")
            pieces.append((text[len(done):], message["role"] == "assistant"))
            done = text
        return [p for p in pieces if p[0]]
    raise ValueError(f"Unknown template {template!r}; choose one of {', '.join(TEMPLATES)}.")


def generation_prompt(messages: list[dict], template: str, tokenizer) -> list[str]:
    """The prompt a model trained with `template` answers: everything `segments` renders before the next assistant
    turn, after `messages` (which end with the user's question), with the BOS that `LLaVADataset` puts in front of
    non-chat samples. The pieces are returned separately because training tokenizes them one by one: joining them
    first would let BPE merge across a joint and give the model ids it never saw."""
    pieces = segments([*messages, {"role": "assistant", "content": ""}], template, tokenizer)
    if pieces and pieces[-1][1]:  # the (empty) answer itself, with its end-of-turn text
        pieces = pieces[:-1]
    bos = [tokenizer.bos_token] if template != "chat" and tokenizer.bos_token_id is not None else []
    return bos + [text for text, _ in pieces]
