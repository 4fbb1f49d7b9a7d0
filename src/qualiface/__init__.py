"""qualiface: quality-aware face recognition (embedding + explicit recognizability score).

Importing the package is cheap and has no side effects; the families live in sub-packages:
``qualiface.backbones``, ``qualiface.heads``, ``qualiface.data``, ``qualiface.train``,
``qualiface.eval`` and ``qualiface.infer``.
"""

__version__ = "0.1.0"
