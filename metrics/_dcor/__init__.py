"""The kernels behind :mod:`leakaudit.metrics.dcor`, which holds the public functions.

:mod:`.rows` reads and checks the inputs, :mod:`.exact` is the blockwise pass and the
statistics it yields, :mod:`.pvalue` the tests of independence, :mod:`.projection` the
one-dimensional statistics of the random-projection estimate, and :mod:`.autograd` the
pieces of the differentiable batch dCor.
"""
