"""Data recipes: YAML files that say which datasets, in which format and mixture, each stage reads.

``load_recipe_data`` is the one entry point the stages call; data_recipes/README.md documents
the recipe schema, the formats and the error policy.
"""

from align.data.load import load_recipe_data
from align.data.recipe import resolve_recipe_path
from align.data.report import RecipeData, SourceReport

__all__ = ["RecipeData", "SourceReport", "load_recipe_data", "resolve_recipe_path"]
