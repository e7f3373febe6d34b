""" "Does it fuse?": a toy-scale run of the WRPO paper's pipeline and its Table 1 comparison, on a CPU.

``python -m fusion_demo`` (``make fusion-demo``): tiny source models each trained on one family of
arithmetic word problems (``tasks``), a weak tiny target, then ``wrpo data sample / score / build /
split``, ``wrpo sft`` and ``wrpo train`` (DPO and WRPO) exactly as a user would run them (``pipeline``),
and greedy exact-match accuracy on held-out problems (``evaluate``), written and plotted by ``report``.
"""
