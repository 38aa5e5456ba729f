"""Compose and validate an experiment config from the Hydra tree in ``conf/``.

``conf/`` is the single source of truth. Every entry point (``make run``, the
launcher, ``flwr run . --run-config "overrides='...'"``, Hydra sweeps, tests)
goes through :func:`compose_config`, so the same overrides always give the same
resolved config, whichever process composes it.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"

STRATEGIES = ("fedavg", "fedavgm", "ass", "staleness_clustered")
TASKS = ("mnist", "breastmnist")
PARTITIONS = ("iid", "dirichlet")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlruns' / 'mlflow.db'}"


class ConfigError(ValueError):
    """A bad experiment setting; the message names the value and the fix."""


def split_overrides(overrides: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Turn ``"a=1 b='x y'"`` (a run-config string) into Hydra override strings."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


def join_overrides(overrides: list[str]) -> str:
    """Inverse of :func:`split_overrides`, safe to embed in a run-config string."""
    return " ".join(shlex.quote(o) for o in overrides)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _explain_composition_error(err: Exception, overrides: list[str]) -> ConfigError:
    text = str(err)
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    for group in groups:
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") == group and value not in _group_options(group):
                return ConfigError(
                    f"unknown {group} '{value}': choose one of "
                    f"{', '.join(_group_options(group))} (conf/{group}/*.yaml)"
                )
    if "is not in struct" in text or "Could not override" in text or "Key '" in text:
        bad = next(
            (o for o in overrides if o.partition("=")[0].lstrip("+~") in text), None
        )
        name = bad.partition("=")[0] if bad else text.split("'")[1] if "'" in text else text
        return ConfigError(
            f"unknown config key '{name}': check the spelling against "
            "conf/config.yaml and conf/<group>/*.yaml (python -m fl_server.launch "
            "--show-config prints the whole tree)"
        )
    return ConfigError(f"cannot compose the config from {overrides}: {text.splitlines()[0]}")


def compose_config(
    overrides: str | list[str] | tuple[str, ...] | None = None,
    project_dir: str | Path | None = None,
) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides and validate it.

    Parameters
    ----------
    overrides : str or list of str, optional
        Hydra override strings (``["strategy=fedavgm", "partition.rho=10"]``) or
        one space-separated string of them, as carried in Flower's run-config.
    project_dir : str or Path, optional
        Directory that relative data paths are resolved against. Defaults to
        the directory that holds ``conf/``.

    Returns
    -------
    DictConfig
        The resolved, validated config (read-only, struct mode).

    Raises
    ------
    ConfigError
        For an unknown group option or key, or an out-of-range value.
    """
    override_list = split_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=override_list)
    except (ConfigCompositionException, MissingConfigException, ValueError) as err:
        # hydra's OverrideParseException is a ValueError subclass (e.g. "a=")
        raise _explain_composition_error(err, override_list) from None
    except Exception as err:  # omegaconf errors for keys not in struct
        raise _explain_composition_error(err, override_list) from None
    return finalize_config(cfg, project_dir)


def finalize_config(cfg: DictConfig, project_dir: str | Path | None = None) -> DictConfig:
    """Resolve data paths, validate, and freeze a config Hydra has composed.

    :func:`compose_config` ends here; so does a ``@hydra.main`` job (a sweep),
    whose config Hydra composed from the same ``conf/`` and overrides.
    """
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.set_struct(cfg, True)
    cfg = _resolve_paths(cfg, Path(project_dir) if project_dir else PROJECT_DIR)
    validate_config(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _resolve_paths(cfg: DictConfig, project_dir: Path) -> DictConfig:
    path = cfg.task.get("path")
    if path:
        resolved = Path(str(path)).expanduser()
        if not resolved.is_absolute():
            resolved = (project_dir / resolved).resolve()
        with _writable(cfg):
            cfg.task.path = str(resolved)
    return cfg


class _writable:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: Any) -> None:
        OmegaConf.set_struct(self.cfg, True)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig) -> None:
    """Check ranges and cross-field constraints; raise :class:`ConfigError`."""
    _require(
        cfg.strategy.name in STRATEGIES,
        f"unknown strategy '{cfg.strategy.name}': choose one of {', '.join(STRATEGIES)}",
    )
    _require(
        cfg.task.name in TASKS,
        f"unknown task '{cfg.task.name}': choose one of {', '.join(TASKS)}",
    )
    _require(
        cfg.partition.name in PARTITIONS,
        f"unknown partition '{cfg.partition.name}': choose one of {', '.join(PARTITIONS)}",
    )
    _require(
        _is_number(cfg.partition.rho) and cfg.partition.rho >= 1,
        f"partition.rho={cfg.partition.rho} is invalid: the imbalance ratio "
        "n_max/n_min must be >= 1 (1 = balanced), e.g. partition.rho=10",
    )
    if cfg.partition.name == "dirichlet":
        _require(
            _is_number(cfg.partition.alpha) and cfg.partition.alpha > 0,
            f"partition.alpha={cfg.partition.alpha} is invalid: the Dirichlet "
            "concentration must be > 0 (e.g. 0.1 = strong skew, 100 = near IID)",
        )
        _require(
            isinstance(cfg.partition.min_partition_size, int)
            and cfg.partition.min_partition_size >= 0,
            f"partition.min_partition_size={cfg.partition.min_partition_size} is "
            "invalid: use an integer >= 0",
        )
    for key in ("fraction_train", "fraction_evaluate"):
        value = cfg.clients[key]
        low_ok = value > 0 if key == "fraction_train" else value >= 0
        _require(
            _is_number(value) and low_ok and value <= 1,
            f"clients.{key}={value} is invalid: it must lie in "
            f"{'(0, 1]' if key == 'fraction_train' else '[0, 1]'}, e.g. clients.{key}=0.5",
        )
    _require(
        isinstance(cfg.clients.num, int) and cfg.clients.num >= 1,
        f"clients.num={cfg.clients.num} is invalid: use an integer >= 1",
    )
    _require(
        isinstance(cfg.clients.min_train, int) and 1 <= cfg.clients.min_train <= cfg.clients.num,
        f"clients.min_train={cfg.clients.min_train} is invalid: use an integer in "
        f"[1, clients.num={cfg.clients.num}]",
    )
    _require(
        isinstance(cfg.num_rounds, int) and cfg.num_rounds >= 1,
        f"num_rounds={cfg.num_rounds} is invalid: use an integer >= 1",
    )
    _require(
        isinstance(cfg.train.local_epochs, int) and cfg.train.local_epochs >= 1,
        f"train.local_epochs={cfg.train.local_epochs} is invalid: use an integer >= 1",
    )
    _require(
        isinstance(cfg.train.batch_size, int) and cfg.train.batch_size >= 1,
        f"train.batch_size={cfg.train.batch_size} is invalid: use an integer >= 1",
    )
    _require(
        _is_number(cfg.train.lr) and cfg.train.lr > 0,
        f"train.lr={cfg.train.lr} is invalid: the learning rate must be > 0",
    )
    _require(
        _is_number(cfg.train.momentum) and 0 <= cfg.train.momentum < 1,
        f"train.momentum={cfg.train.momentum} is invalid: use a value in [0, 1)",
    )
    if cfg.strategy.name == "fedavgm":
        _require(
            _is_number(cfg.strategy.server_momentum) and 0 <= cfg.strategy.server_momentum < 1,
            f"strategy.server_momentum={cfg.strategy.server_momentum} is invalid: "
            "use a value in [0, 1) (paper 001 uses 0.9)",
        )
        _require(
            _is_number(cfg.strategy.server_learning_rate)
            and cfg.strategy.server_learning_rate > 0,
            f"strategy.server_learning_rate={cfg.strategy.server_learning_rate} is "
            "invalid: it must be > 0",
        )
    if cfg.strategy.name == "ass":
        for key in ("alpha", "beta", "gamma"):
            value = cfg.strategy[key]
            _require(
                _is_number(value) and value >= 0,
                f"strategy.{key}={value} is invalid: ASS exponents must be >= 0 "
                "(0 switches that factor off)",
            )
        _require(
            _is_number(cfg.strategy.floor) and 0 <= cfg.strategy.floor < 1,
            f"strategy.floor={cfg.strategy.floor} is invalid: use a value in [0, 1) "
            "(0 = the paper's literal min-max normalisation)",
        )
    if cfg.strategy.name == "staleness_clustered":
        _validate_staleness_clustered(cfg)
    deadline = cfg.devices.deadline_s
    _require(
        deadline is None or (_is_number(deadline) and deadline > 0),
        f"devices.deadline_s={deadline} is invalid: use a positive number of virtual "
        "seconds, or null for synchronous rounds",
    )
    from fl_clients.devices import Fleet  # no torch: cheap

    Fleet.from_config(cfg.devices)  # raises ProfileError (a ValueError) naming the value
    path = cfg.task.get("path")
    if path is not None:
        _require(
            Path(path).is_file(),
            f"task.path={path} does not exist: point task.path at a MedMNIST .npz "
            "(e.g. task.path=../shared/data/medmnist/breastmnist.npz)",
        )
    _require(
        isinstance(cfg.simulation.cpus_per_client, int) and cfg.simulation.cpus_per_client >= 1,
        f"simulation.cpus_per_client={cfg.simulation.cpus_per_client} is invalid: Flower takes "
        "a whole number of CPUs per simulated client, e.g. simulation.cpus_per_client=1",
    )
    _require(
        _is_number(cfg.simulation.round_timeout_s) and cfg.simulation.round_timeout_s > 0,
        f"simulation.round_timeout_s={cfg.simulation.round_timeout_s} is invalid: must be > 0",
    )


def _validate_staleness_clustered(cfg: DictConfig) -> None:
    sc = cfg.strategy
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
        _require(isinstance(sc.num_clusters, int) and 1 <= sc.num_clusters <= cfg.clients.num,
                 f"strategy.num_clusters={sc.num_clusters} is invalid: use an integer in "
                 f"[1, clients.num={cfg.clients.num}]")
    if sc.similarity_threshold is not None:
        _require(_is_number(sc.similarity_threshold) and -1 < sc.similarity_threshold < 1,
                 f"strategy.similarity_threshold={sc.similarity_threshold} is invalid: use a value in (-1, 1)")
    _require(isinstance(sc.recluster_every, int) and sc.recluster_every >= 1,
             f"strategy.recluster_every={sc.recluster_every} is invalid: use an integer >= 1")
    _require(_is_number(sc.server_momentum) and 0 <= sc.server_momentum < 1,
             f"strategy.server_momentum={sc.server_momentum} is invalid: use a value in [0, 1)")
    _require(isinstance(sc.max_staleness, int) and sc.max_staleness >= 0,
             f"strategy.max_staleness={sc.max_staleness} is invalid: use an integer >= 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Flatten the resolved config into ``{"a.b": value}`` (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def default_run_name(cfg: DictConfig) -> str:
    """A short, human-readable run name for MLflow and the progress display."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    part = cfg.partition.name
    if part == "dirichlet":
        part += f"{cfg.partition.alpha:g}"
    return f"{cfg.task.name}-{cfg.strategy.name}-{part}-rho{cfg.partition.rho:g}-s{cfg.seed}"
