"""Decoder policies, by exact name. Adding one is a new file here plus one entry in `DECODERS`: the policy class
carries its name, options, parameter groups, initialisation and cost, and config checks, recipes, the CLI, FLOPs,
benchmarks and the contract tests all read them from here."""

from __future__ import annotations

from dataclasses import fields

from leanvlm.decoders.base import DecoderPolicy, ImageContext, PolicyOptions, Preset
from leanvlm.decoders.cache import KVCache
from leanvlm.decoders.divprune import DivPruneDecoder
from leanvlm.decoders.fastv import FastVDecoder
from leanvlm.decoders.himix import HiMixDecoder
from leanvlm.decoders.pool import PoolDecoder
from leanvlm.decoders.proxyv import ProxyVDecoder
from leanvlm.decoders.pyramiddrop import PyramidDropDecoder
from leanvlm.decoders.random import RandomDecoder
from leanvlm.decoders.vanilla import VanillaDecoder
from leanvlm.decoders.vica import ViCADecoder
from leanvlm.decoders.visionzip import VisionZipDecoder

DECODERS: dict[str, type[DecoderPolicy]] = {
    VanillaDecoder.name: VanillaDecoder,
    HiMixDecoder.name: HiMixDecoder,
    ProxyVDecoder.name: ProxyVDecoder,
    RandomDecoder.name: RandomDecoder,
    PoolDecoder.name: PoolDecoder,
    DivPruneDecoder.name: DivPruneDecoder,
    VisionZipDecoder.name: VisionZipDecoder,
    ViCADecoder.name: ViCADecoder,
    FastVDecoder.name: FastVDecoder,
    PyramidDropDecoder.name: PyramidDropDecoder,
}
# The reference every report compares against: LLaVA decoding with all tokens in every layer.
BASELINE = VanillaDecoder.name
# What `bench`, `compare` and `loadtest` run unless told otherwise: the baseline and the two methods leanvlm is
# built around; the other policies are named with --decoder.
HEADLINE = (VanillaDecoder.name, HiMixDecoder.name, ProxyVDecoder.name)


def check_decoder_name(name: str) -> None:
    if name not in DECODERS:
        raise ValueError(f"Unknown decoder {name!r}; available decoders: {', '.join(DECODERS)}.")


def option_names(policy: type[DecoderPolicy]) -> list[str]:
    return [option.name for option in fields(policy.Options)]


def all_option_names() -> list[str]:
    """Every registered policy's option names, each once."""
    return list(dict.fromkeys(name for policy in DECODERS.values() for name in option_names(policy)))


def build_decoder(config, language_model) -> DecoderPolicy:
    check_decoder_name(config.decoder)
    return DECODERS[config.decoder](config, language_model)


__all__ = [
    "BASELINE",
    "DECODERS",
    "HEADLINE",
    "DecoderPolicy",
    "ImageContext",
    "KVCache",
    "PolicyOptions",
    "Preset",
    "all_option_names",
    "build_decoder",
    "check_decoder_name",
    "option_names",
]
