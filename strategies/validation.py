"""Each strategy's parameters, checked where strategies are built (one clear
``ValueError`` naming the value and the fix; the config layer reports it)."""

from __future__ import annotations

from typing import Any


def validate_strategy(strategy: Any, num_clients: int) -> None:
    """Check ``strategy`` (the ``cfg.strategy`` node) for a federation of ``num_clients``."""
    if strategy.name == "fedavgm":
        _require(
            _is_number(strategy.server_momentum) and 0 <= strategy.server_momentum < 1,
            f"strategy.server_momentum={strategy.server_momentum} is invalid: "
            "use a value in [0, 1) (paper 001 uses 0.9)",
        )
        _require(
            _is_number(strategy.server_learning_rate)
            and strategy.server_learning_rate > 0,
            f"strategy.server_learning_rate={strategy.server_learning_rate} is "
            "invalid: it must be > 0",
        )
    if strategy.name == "ass":
        for key in ("alpha", "beta", "gamma"):
            value = strategy[key]
            _require(
                _is_number(value) and value >= 0,
                f"strategy.{key}={value} is invalid: ASS exponents must be >= 0 "
                "(0 switches that factor off)",
            )
        _require(
            _is_number(strategy.floor) and 0 <= strategy.floor < 1,
            f"strategy.floor={strategy.floor} is invalid: use a value in [0, 1) "
            "(0 = the paper's literal min-max normalisation)",
        )
    if strategy.name == "staleness_clustered":
        _staleness_clustered(strategy, num_clients)
    _robust(strategy, num_clients)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _staleness_clustered(sc: Any, num_clients: int) -> None:
    _require(_is_number(sc.mixing) and 0 < sc.mixing <= 1,
             f"strategy.mixing={sc.mixing} is invalid: use a value in (0, 1]")
    _require(sc.discount in ("constant", "polynomial", "hinge"),
             f"strategy.discount={sc.discount} is unknown: use constant, polynomial or hinge")
    _require(_is_number(sc.discount_a) and sc.discount_a > 0,
             f"strategy.discount_a={sc.discount_a} is invalid: must be > 0")
    _require(isinstance(sc.discount_b, int) and sc.discount_b >= 0,
             f"strategy.discount_b={sc.discount_b} is invalid: use an integer >= 0")
    _require(sc.num_clusters is None or sc.similarity_threshold is None,
             "strategy.num_clusters and strategy.similarity_threshold are exclusive: set one to null")
    if sc.num_clusters is not None:
        _require(isinstance(sc.num_clusters, int) and 1 <= sc.num_clusters <= num_clients,
                 f"strategy.num_clusters={sc.num_clusters} is invalid: use an integer in "
                 f"[1, clients.num={num_clients}]")
    if sc.similarity_threshold is not None:
        _require(_is_number(sc.similarity_threshold) and -1 < sc.similarity_threshold < 1,
                 f"strategy.similarity_threshold={sc.similarity_threshold} is invalid: use a value in (-1, 1)")
    _require(isinstance(sc.recluster_every, int) and sc.recluster_every >= 1,
             f"strategy.recluster_every={sc.recluster_every} is invalid: use an integer >= 1")
    _require(_is_number(sc.server_momentum) and 0 <= sc.server_momentum < 1,
             f"strategy.server_momentum={sc.server_momentum} is invalid: use a value in [0, 1)")
    _require(isinstance(sc.max_staleness, int) and sc.max_staleness >= 0,
             f"strategy.max_staleness={sc.max_staleness} is invalid: use an integer >= 0")
    sketch_dim = sc.sketch_dim
    _require(sketch_dim is None
             or (isinstance(sketch_dim, int) and not isinstance(sketch_dim, bool) and sketch_dim >= 2),
             f"strategy.sketch_dim={sketch_dim} is invalid: use an integer >= 2 (e.g. 256) to cluster "
             "sketches of the updates, or null to cluster the full updates")


def _robust(st: Any, n: int) -> None:
    """Flower's robust aggregators (conf/strategy/{fedmedian,fedtrimmedavg,krum}.yaml)."""
    if st.name == "fedtrimmedavg":
        _require(_is_number(st.beta) and 0 <= st.beta < 0.5,
                 f"strategy.beta={st.beta} is invalid: the fraction trimmed from each end must lie "
                 "in [0, 0.5), e.g. strategy.beta=0.2")
    if st.name == "krum":
        f = st.num_malicious_nodes
        _require(isinstance(f, int) and f >= 0 and n >= 2 * f + 3,
                 f"strategy.num_malicious_nodes={f} is invalid: Krum tolerates f malicious of n clients "
                 f"only for n >= 2f + 3 (clients.num={n} allows f <= {max((n - 3) // 2, 0)})")
        m = st.num_nodes_to_select
        _require(isinstance(m, int) and 1 <= m <= n - (f if isinstance(f, int) else 0),
                 f"strategy.num_nodes_to_select={m} is invalid: use an integer in [1, clients.num - "
                 f"num_malicious_nodes] (1 = Krum, more = Multi-Krum averaging the best m)")
