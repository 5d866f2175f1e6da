"""Training: staged YAML recipes run on accelerate."""

from leanvlm.train.recipe import Recipe, load_recipe, recipe_from_dict
from leanvlm.train.trainer import Trainer, build_model

__all__ = ["Recipe", "Trainer", "build_model", "load_recipe", "recipe_from_dict"]
