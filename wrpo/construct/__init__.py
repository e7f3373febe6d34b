"""Data construction (DESIGN §1): sampled responses -> scores -> WRPO quadruples -> SFT / preference split.

``wrpo data prompts | sample | score | build | split | tiny-model`` (see ``wrpo.construct.cli``); the
row formats are described in ``wrpo.construct.rows``.
"""
