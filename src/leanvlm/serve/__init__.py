"""HTTP over the inference engine: the OpenAI-compatible app (`app`), its wire types (`protocol`), image URLs
(`images`), uvicorn (`server`) and the load test (`loadtest`). Needs the `serve` extra (fastapi, uvicorn, httpx2)."""

from importlib.util import find_spec

MISSING = [name for name in ("fastapi", "uvicorn", "httpx2") if find_spec(name) is None]
if MISSING:
    raise ModuleNotFoundError(f"leanvlm's server needs {', '.join(MISSING)}: install the serve extra, "
                              "pip install 'leanvlm[serve]' (or -e '.[serve]' in a checkout).")
