"""The generalized Gaussian: math (:mod:`.math`), fitting (:mod:`.fit`) and the
``torch.distributions`` law (:mod:`.distribution`). Imports nothing else of ggprior.

``ggprior.gg.fit`` is the fitting *function* (the module is ``ggprior.gg.fit`` in ``sys.modules``;
import names from it with ``from ggprior.gg.fit import ...``).
"""

from .distribution import GeneralizedGaussian
from .fit import (
    GGFit,
    GoodnessOfFit,
    MomentAccumulator,
    fit,
    goodness_of_fit,
    ks_distance,
    mean_loglik,
    refine_mle,
)
from .math import (
    GAMMA_MAX,
    GAMMA_MIN,
    LOG2E,
    RHO_LIMIT,
    beta_from_std,
    cdf,
    entropy,
    gamma_from_ratio,
    log_normalizer,
    logpdf,
    pdf,
    ppf,
    rho,
    sample,
    variance,
)
