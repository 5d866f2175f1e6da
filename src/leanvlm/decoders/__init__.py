"""Decoder policies, by exact name. Adding one is a new file here plus one entry in `DECODERS`."""

from __future__ import annotations

from leanvlm.decoders.base import DecoderPolicy, ImageContext
from leanvlm.decoders.cache import KVCache
from leanvlm.decoders.himix import HiMixDecoder
from leanvlm.decoders.proxyv import ProxyVDecoder
from leanvlm.decoders.vanilla import VanillaDecoder

DECODERS: dict[str, type[DecoderPolicy]] = {
    VanillaDecoder.name: VanillaDecoder,
    HiMixDecoder.name: HiMixDecoder,
    ProxyVDecoder.name: ProxyVDecoder,
}


def check_decoder_name(name: str) -> None:
    if name not in DECODERS:
        raise ValueError(f"Unknown decoder {name!r}; available decoders: {', '.join(DECODERS)}.")


def build_decoder(config, language_model) -> DecoderPolicy:
    check_decoder_name(config.decoder)
    return DECODERS[config.decoder](config, language_model)


__all__ = ["DECODERS", "DecoderPolicy", "ImageContext", "KVCache", "build_decoder", "check_decoder_name"]
