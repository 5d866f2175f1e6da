"""`leanvlm flops`: the analytic prefill cost of every decoder policy for one model shape, one decoded token's
cost, and how they are shown (a table, or one JSON object for one decoder)."""

from __future__ import annotations

from leanvlm.decoders import BASELINE, DECODERS
from leanvlm.measure.flops import decode_flops, decoder_flops


def run(llm: str, vision: str, text_tokens: int, *, vision_tokens: int | None = None, crops: int = 1,
        convention: str = "prefill", **options) -> dict:
    """Prefill FLOPs of every registered decoder (each with its own of the decoder `options`), and of one decoded
    token after that prefill."""
    results = {
        name: decoder_flops(llm, vision, text_tokens, name, vision_tokens=vision_tokens, crops=crops,
                            convention=convention, **options)
        for name in DECODERS
    }
    tokens = results[BASELINE]["tokens"]
    step = decode_flops(llm, tokens["vision"] + tokens["text"], convention)
    return {"llm": llm, "vision": vision, "convention": convention, "tokens": tokens, "results": results,
            "decode_flops_per_token": step["total_flops"]}


def for_decoder(report: dict, decoder: str) -> dict:
    """One decoder's FLOPs with its ratio to the baseline, every decoder's total and the decode cost."""
    results = report["results"]
    chosen = dict(results[decoder], decoder=decoder, llm=report["llm"], vision=report["vision"])
    chosen["ratio_to_vanilla"] = chosen["total_flops"] / results[BASELINE]["total_flops"]
    chosen["all_decoders"] = {name: r["total_flops"] for name, r in results.items()}
    chosen["decode_flops_per_token"] = report["decode_flops_per_token"]
    return chosen


def render(report: dict, console) -> None:
    """GFLOPs per decoder and part, each total against the baseline, then the decode cost."""
    from rich.table import Table

    results, tokens = report["results"], report["tokens"]
    baseline = results[BASELINE]["total_flops"]
    parts = sorted({part for r in results.values() for part in r["breakdown"]})
    table = Table(title=f"Decoder prefill GFLOPs: {report['llm']}, {report['vision']}, {tokens['vision']} vision + "
                        f"{tokens['text']} text tokens ({report['convention']})")
    table.add_column("decoder", no_wrap=True)
    for column in ["total", f"vs {BASELINE}", *parts]:
        table.add_column(column, justify="right")
    for name, result in results.items():
        cells = [f"{result['breakdown'].get(part, 0) / 1e9:.1f}" for part in parts]
        total = result["total_flops"]
        table.add_row(name, f"{total / 1e9:.1f}", f"{total / baseline:.1%}", *cells)
    console.print(table)
    console.print(f"one decoded token at {tokens['vision'] + tokens['text']} tokens of context: "
                  f"{report['decode_flops_per_token'] / 1e9:.2f} GFLOPs (every decoder)")
