"""`python -m leanvlm ...` (e.g. under `accelerate launch -m leanvlm train RECIPE.yaml`)."""

from leanvlm.cli import app

app()
