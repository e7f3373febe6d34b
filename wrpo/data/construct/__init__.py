"""Data construction (docs/method.md §1): samples -> scores -> WRPO quadruples -> SFT / preference split.

``wrpo data prompts | sample | score | build | split | tiny-model`` (see ``wrpo.data.construct.command``); the
row formats are described in ``wrpo.data.construct.rows``.
"""
