"""Recipe search: data-driven choices of merging coefficients and ingredients.

Each search writes an ordinary recipe YAML that ``alloykit merge`` then runs:

* :func:`~alloykit.search.run.adamerging_search` -- AdaMerging (Yang et al., ICLR 2024),
  task- or layer-wise coefficients learned by entropy minimisation on unlabelled inputs;
* :func:`~alloykit.search.run.greedy_soup_search` and
  :func:`~alloykit.search.run.uniform_soup_recipe` -- model soups (Wortsman et al., 2022).
"""

from alloykit.search.adamerging import SearchResult, TaskVectorModel, adamerging
from alloykit.search.soups import greedy_soup

__all__ = ["SearchResult", "TaskVectorModel", "adamerging", "greedy_soup"]
