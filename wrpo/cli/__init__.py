"""The ``wrpo`` command line: ``wrpo train``, ``wrpo sft`` (:mod:`.main`, options help in :mod:`.help`) and
``wrpo data`` (:mod:`wrpo.data.construct.command`)."""

from wrpo.cli.main import main

__all__ = ["main"]
