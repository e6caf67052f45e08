"""Optional integrations of jacbatch with other libraries.

Each submodule needs its library (an extra of the ``jacbatch`` package); importing this package
imports none of them.

* :mod:`jacbatch.integrations.laplace`: a laplace-torch curvature backend (extra ``[laplace]``).
* :mod:`jacbatch.integrations.salib`: SALib's DGSM (``SALib.analyze.dgsm``) with exact
  derivatives (extra ``[salib]``; runs without SALib, returning a dict with ``to_df()``).
"""
