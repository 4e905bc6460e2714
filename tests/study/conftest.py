"""Fixtures of the study's tests: the recipe's (one torch thread per module, the digits data set loaded once)."""

from tests.recipe.conftest import digits, one_thread  # noqa: F401  (fixtures, found by pytest by name)
