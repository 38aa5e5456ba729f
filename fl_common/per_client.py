"""Which clients a large federation reports one by one.

Per-client values (``epsilon_p<id>``, ``ass_weight_p<id>``, ``cluster_p<id>``,
the forecaster's ``site<id>_*``) are one MLflow metric per client and round:
fine for 10 clients, 20,000+ metric series for 1,000 clients over 20 rounds.
Above a limit (``tracking.per_client_limit``) they are kept for a fixed
sample of clients and summarised over all of them; the forecaster's server
also scores a fixed sample of sites (``task.eval_sites``).
"""

from __future__ import annotations

import numpy as np

# A constant, not the run's seed: every run of a federation size reports the
# same clients, so runs (and seeds) stay comparable client by client.
SAMPLE_SEED = 1_000_003


def sample_clients(num_clients: int, limit: int | None) -> tuple[int, ...] | None:
    """``limit`` partition ids (sorted) of ``num_clients``, or None for all of them.

    None when ``limit`` is None or ``num_clients <= limit``. Samples are
    nested: for one federation size a larger limit's sample contains every
    smaller one's (the first ``limit`` of one fixed permutation).
    """
    if limit is None or num_clients <= limit:
        return None
    order = np.random.default_rng(SAMPLE_SEED).permutation(num_clients)
    return tuple(sorted(int(i) for i in order[:limit]))
