"""Built-in metric plugins, importable as `leakaudit.metrics`.

The maths is written once, as pure functions: :mod:`.dcor` (distance correlation),
:mod:`.mi` (mutual information), :mod:`.ssim` (structural similarity) and :mod:`.distance`
(intra-class distance). :mod:`.plugins` registers the store-reading metrics; :mod:`.bounds`
the attacker-independent bounds (the k-NN Bayes risk, Fisher-information leakage).
"""

from leakaudit.metrics import bounds, plugins  # noqa: F401  (registers the plugins)
