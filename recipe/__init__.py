"""The training recipe behind ``train.py`` and ``examples/train_accelerate.py``: Hydra wiring,
data, flow matching, callbacks.

It lives beside ``train.py`` rather than inside ``cp_plugin`` so that the library installs and
imports without the recipe's tools (Hydra, W&B, scikit-learn, matplotlib); it is not installed
and is imported from the checkout (the scripts' directory or pytest's ``pythonpath``).
"""
