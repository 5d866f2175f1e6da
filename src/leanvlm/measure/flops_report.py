"""`leanvlm flops`: the analytic prefill cost of every decoder policy for one model shape, with the vision encoder's
and the end-to-end sum, one decoded token's cost, and how they are shown (a table, or one JSON object for one
decoder)."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

from leanvlm.config import parse_variant
from leanvlm.decoders import BASELINE, DECODERS, option_names
from leanvlm.measure.flops import decode_flops, decoder_flops, encoder_flops, resolve_encoder_config, resolve_llm


def run(llm: str, vision: str, text_tokens: int, *, vision_tokens: int | None = None, crops: int = 1,
        convention: str = "prefill", vision_feature_layer: int = -2, tome_r: int = 0, variants: tuple = (),
        **options) -> dict:
    """Prefill FLOPs of every registered decoder (each with its own of the decoder `options`), then of each of
    `variants` (`NAME+key=value...`, a row of its own with its options on top), of the vision encoder it needs (up
    to its deepest feature layer, `tome_r` tokens merged per layer) and of both, and of one decoded token after
    vanilla's prefill. Without `vision_tokens`, each decoder reads what its encoder leaves per crop."""
    rows = [(name, name, options) for name in DECODERS]
    for label in variants:
        _, name, own = parse_variant(label)
        policy = DECODERS[name]
        if tome_r and policy.needs_patch_grid:
            raise ValueError(f"{label}: {name} reads the patch grid, which token merging (--tome-r {tome_r}) "
                             "dissolves.")
        # a row's own options are one model's: refuse those it would not read, as its config would
        mine = {key: value for key, value in own.items() if key in option_names(policy)}
        try:
            policy.Options(**mine).resolved(resolve_llm(llm).layers).refuse_unread()
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from error
        rows.append((label, name, {**options, **own}))
    results = {}
    for label, name, row_options in rows:
        if tome_r and DECODERS[name].needs_patch_grid:  # leanvlm refuses that model (LeanVLMConfig)
            continue
        encoder = encoder_cost(name, vision, crops, vision_feature_layer, tome_r, row_options)
        left = encoder["tokens"]["patches"] * crops if vision_tokens is None else vision_tokens
        result = decoder_flops(llm, vision, text_tokens, name, crops=crops, convention=convention,
                               vision_tokens=left, **row_options)
        results[label] = dict(result, encoder=encoder, end_to_end_flops=result["total_flops"] + encoder["total_flops"])
    tokens = results[BASELINE]["tokens"]
    step = decode_flops(llm, tokens["vision"] + tokens["text"], convention)
    return {"llm": llm, "vision": vision, "convention": convention, "tokens": tokens, "results": results,
            "vision_feature_layer": vision_feature_layer, "tome_r": tome_r,
            "decode_flops_per_token": step["total_flops"]}


def encoder_cost(decoder: str, vision, crops: int, vision_feature_layer: int, tome_r: int, options: dict) -> dict:
    """`encoder_flops` for the layers `decoder` reads: `vision_feature_layer`, or its own option's (HiMix's
    himix_feature_layers), as its model config would resolve them."""
    from leanvlm.encoder import layers_needed

    policy = DECODERS[decoder]
    own = policy.Options(**{name: options[name] for name in option_names(policy) if name in options})
    config = SimpleNamespace(vision_feature_layer=vision_feature_layer, **asdict(own))
    depth = layers_needed(resolve_encoder_config(vision).num_hidden_layers, policy.feature_layers(config))
    return encoder_flops(vision, crops, layers=depth, merge_per_layer=tome_r)


def for_decoder(report: dict, decoder: str) -> dict:
    """One decoder's FLOPs with its ratio to the baseline, every decoder's total and the decode cost."""
    results = report["results"]
    if decoder in DECODERS and decoder not in results:
        raise ValueError(f"The {decoder} decoder reads the encoder's patch grid, which token merging (--tome-r "
                         f"{report['tome_r']}) dissolves; choose another decoder or --tome-r 0.")
    if decoder not in results:
        raise ValueError(f"{decoder!r} is no row of this report; rows: {', '.join(results)} (a variant needs "
                         "--variant).")
    chosen = dict(results[decoder], decoder=decoder, llm=report["llm"], vision=report["vision"])
    chosen["ratio_to_vanilla"] = chosen["total_flops"] / results[BASELINE]["total_flops"]
    chosen["encoder_flops"] = chosen["encoder"]["total_flops"]
    chosen["end_to_end_ratio_to_vanilla"] = chosen["end_to_end_flops"] / results[BASELINE]["end_to_end_flops"]
    chosen["all_decoders"] = {name: r["total_flops"] for name, r in results.items()}
    chosen["decode_flops_per_token"] = report["decode_flops_per_token"]
    return chosen


def render(report: dict, console) -> None:
    """The encoder's GFLOPs, then per decoder and part the decoder's, each total against the baseline, and the
    end-to-end (encoder + decoder) totals; then the decode cost."""
    from rich.table import Table

    results, tokens = report["results"], report["tokens"]
    baseline, baseline_e2e = results[BASELINE]["total_flops"], results[BASELINE]["end_to_end_flops"]
    encoder = results[BASELINE]["encoder"]
    merged = f" -> {encoder['tokens']['output']} (ToMe r={report['tome_r']})" if report["tome_r"] else ""
    console.print(f"vision encoder {report['vision']}, {encoder['layers']} layers (to hidden state "
                  f"{report['vision_feature_layer']}), {encoder['tokens']['input']}{merged} tokens per crop: "
                  f"{encoder['per_crop_flops'] / 1e9:.1f} GFLOPs per crop, {encoder['total_flops'] / 1e9:.1f} for "
                  f"{encoder['crops']} crop{'s' if encoder['crops'] > 1 else ''}")
    parts = sorted({part for r in results.values() for part in r["breakdown"]})
    table = Table(title=f"Prefill GFLOPs: {report['llm']}, {report['vision']}, {tokens['vision']} vision + "
                        f"{tokens['text']} text tokens ({report['convention']}): decoder by part, then with the "
                        "encoder")
    table.add_column("decoder", no_wrap=True)
    for column in ["total", f"vs {BASELINE}", *parts, "encoder", "end-to-end", f"e2e vs {BASELINE}"]:
        table.add_column(column, justify="right")
    for name, result in results.items():
        cells = [f"{result['breakdown'].get(part, 0) / 1e9:.1f}" for part in parts]
        total, e2e = result["total_flops"], result["end_to_end_flops"]
        table.add_row(name, f"{total / 1e9:.1f}", f"{total / baseline:.1%}", *cells,
                      f"{result['encoder']['total_flops'] / 1e9:.1f}", f"{e2e / 1e9:.1f}", f"{e2e / baseline_e2e:.1%}")
    console.print(table)
    if not set(DECODERS) <= set(results):
        console.print(f"not shown: {', '.join(sorted(set(DECODERS) - set(results)))} (reads the patch grid, which "
                      "token merging dissolves)")
    console.print(f"one decoded token at {tokens['vision'] + tokens['text']} tokens of context: "
                  f"{report['decode_flops_per_token'] / 1e9:.2f} GFLOPs (decoders that cache every vision token; less "
                  "under sparse HiMix, ViCA and token reductions, which cache fewer)")
