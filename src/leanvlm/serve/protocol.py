"""The OpenAI chat-completions wire types leanvlm accepts and returns (the subset a VLM server needs). Fields clients
send that leanvlm has no use for are ignored; fields that would change the answer and are not supported are refused
by `ChatCompletionRequest.unsupported`."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted and ignored: the model sees every image at its encoder's resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)  # 0: greedy
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # not in OpenAI's API; vLLM's extension, 0 or -1 = no limit
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # as OpenAI: up to 4 strings
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: only max_tokens, stop and stop_token_ids end the answer
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None

    def unsupported(self) -> str | None:
        """Why this request asks for something leanvlm does not do, or None."""
        if self.n != 1:
            return "n must be 1: send one request per answer."
        if self.logprobs:
            return "logprobs are not supported."
        extra = self.model_extra or {}
        defaults = {"frequency_penalty": (0, None), "presence_penalty": (0, None), "repetition_penalty": (1, None),
                    "logit_bias": (None, {}), "min_tokens": (0, None), "tools": (None, []), "functions": (None, []),
                    "response_format": (None, {"type": "text"}), "tool_choice": (None, "none")}
        for name, harmless in defaults.items():
            if name in extra and extra[name] not in harmless:
                return f"{name}={extra[name]!r} is not supported by this server; leave it out."
        return None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
