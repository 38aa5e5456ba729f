"""Compose and validate an experiment config from the Hydra tree in ``conf/``.

``conf/`` is the single source of truth. Every entry point (``make run``, the
launcher, ``flwr run . --run-config "overrides='...'"``, Hydra sweeps, tests)
goes through :func:`compose_config`, so the same overrides always give the same
resolved config, whichever process composes it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from fl_server.engine.flat_config import flatten  # noqa: F401  (re-exported: experiments and scripts use it)
from strategies.validation import validate_strategy

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_DIR / "conf"



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
        name = _unknown_key(text, overrides)
        return ConfigError(
            f"unknown config key '{name}': check the spelling against "
            "conf/config.yaml and conf/<group>/*.yaml (python -m fl_server.launch "
            "--show-config prints the whole tree)"
        )
    return ConfigError(f"cannot compose the config from {overrides}: {text.splitlines()[0]}")


def _unknown_key(text: str, overrides: list[str]) -> str:
    """The full dotted key an OmegaConf/Hydra error complains about.

    OmegaConf names it as ``full_key: task.hyper.lamda``; Hydra's "Could not
    override 'x.y'" names the override. Matching the overrides against the
    text instead would pick ``task`` out of ``task=ppo task.hyper.lamda=0.9``.
    """
    full_key = re.search(r"full_key: ([\w.\-]+)", text)
    if full_key:
        return full_key.group(1)
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    quoted = re.findall(r"'([^']+)'", text)
    for candidate in quoted:
        if candidate in keys:
            return candidate
    named = [k for k in keys if k in text]
    return max(named, key=len) if named else (quoted[0] if quoted else text)


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
        if GlobalHydra.instance().is_initialized():  # inside a @hydra.main job (a sweep), whose conf/ this is
            cfg = compose(config_name="config", overrides=override_list)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="config", overrides=override_list)
    except (ConfigCompositionException, MissingConfigException, ValueError) as err:
        # hydra's OverrideParseException is a ValueError subclass (e.g. "a=")
        raise _explain_composition_error(err, override_list) from None
    except Exception as err:  # omegaconf errors for keys not in struct
        raise _explain_composition_error(err, override_list) from None
    preferred = cfg.task.get("default_strategy")
    if preferred and not any(o.lstrip("+~").split("=")[0] == "strategy" for o in override_list):
        # A task may name its own default strategy (RL agents: FedAvgM, paper
        # 001 §4.3); Hydra's defaults list cannot let one group pick another's.
        return compose_config([f"strategy={preferred}", *override_list], project_dir)
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
    for key in ("path", "trace_dir"):  # data files (image npz) and trace folders
        path = cfg.task.get(key)
        if path:
            resolved = Path(str(path)).expanduser()
            if not resolved.is_absolute():
                resolved = (project_dir / resolved).resolve()
            with _writable(cfg):
                cfg.task[key] = str(resolved)
    checkpoints = Path(str(cfg.checkpoint.dir)).expanduser()
    if not checkpoints.is_absolute():
        with _writable(cfg):
            cfg.checkpoint.dir = str((project_dir / checkpoints).resolve())
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
    """Check ranges and cross-field constraints; raise :class:`ConfigError`.

    The option lists are those of ``conf/`` (one YAML per option); the task's
    own settings are checked by the task (:meth:`tasks.base.Task.validate`).
    """
    for group in ("strategy", "task", "partition"):
        options = _group_options(group)
        _require(cfg[group].name in options,
                 f"unknown {group} '{cfg[group].name}': choose one of {', '.join(options)} (conf/{group}/*.yaml)")
    _require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and cfg.seed >= 0,
             f"seed={cfg.seed} is invalid: use a whole number >= 0, e.g. seed=1")
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
    try:  # each strategy's parameters, checked where strategies are built
        validate_strategy(cfg.strategy, int(cfg.clients.num))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    deadline = cfg.devices.deadline_s
    _require(
        deadline is None or (_is_number(deadline) and deadline > 0),
        f"devices.deadline_s={deadline} is invalid: use a positive number of virtual "
        "seconds, or null for synchronous rounds",
    )
    from edgesim.devices import Fleet  # no torch: cheap

    Fleet.from_config(cfg.devices)  # raises ProfileError (a ValueError) naming the value
    _validate_task(cfg)
    _require(cfg.checkpoint.resume is None or isinstance(cfg.checkpoint.resume, str),
             f"checkpoint.resume={cfg.checkpoint.resume} is invalid: give the MLflow run id of the "
             "interrupted run (quoted if it looks like a number), or null")
    _validate_privacy(cfg)
    _validate_compression(cfg)
    _validate_fault_handling(cfg)
    _require(
        isinstance(cfg.simulation.cpus_per_client, int) and cfg.simulation.cpus_per_client >= 1,
        f"simulation.cpus_per_client={cfg.simulation.cpus_per_client} is invalid: Flower takes "
        "a whole number of CPUs per simulated client, e.g. simulation.cpus_per_client=1",
    )
    _require(
        _is_number(cfg.simulation.round_timeout_s) and cfg.simulation.round_timeout_s > 0,
        f"simulation.round_timeout_s={cfg.simulation.round_timeout_s} is invalid: must be > 0",
    )
    for key, value in (("simulation.shared_ray", cfg.simulation.shared_ray), ("tracking.profile", cfg.tracking.profile)):
        _require(isinstance(value, bool), f"{key}={value} is invalid: use true or false")
    limit = cfg.tracking.per_client_limit
    _require(limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1),
             f"tracking.per_client_limit={limit} is invalid: use a whole number of clients >= 1, or null (all)")
    from fl_server.experiments import topology  # imports this module

    topology.validate(cfg)


CENTRAL_DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
CENTRAL_DP_STRATEGIES = ("fedavg", "fedavgm", "ass")  # one model per round, which the wrappers noise


def _validate_privacy(cfg: DictConfig) -> None:
    """DP-SGD, central DP and SecAgg+ settings (conf/privacy/)."""
    if "privacy" not in cfg:
        return
    _validate_dpsgd(cfg, cfg.privacy.dpsgd)
    _validate_central_dp(cfg, cfg.privacy.central)
    _validate_secagg(cfg, cfg.privacy.secagg)


def _validate_dpsgd(cfg: DictConfig, dp: DictConfig) -> None:
    _require(_is_number(dp.noise_multiplier) and dp.noise_multiplier >= 0,
             f"privacy.dpsgd.noise_multiplier={dp.noise_multiplier} is invalid: the noise multiplier "
             "must be >= 0, e.g. privacy.dpsgd.noise_multiplier=1.0")
    _require(_is_number(dp.max_grad_norm) and dp.max_grad_norm > 0,
             f"privacy.dpsgd.max_grad_norm={dp.max_grad_norm} is invalid: the per-sample clipping "
             "norm must be > 0, e.g. privacy.dpsgd.max_grad_norm=1.0")
    _require(_is_number(dp.delta) and 0 < dp.delta < 1,
             f"privacy.dpsgd.delta={dp.delta} is invalid: delta must lie in (0, 1), "
             "below 1/(samples per client), e.g. privacy.dpsgd.delta=1e-5")
    for key in ("epsilon_budget", "target_epsilon"):
        value = dp[key]
        _require(value is None or (_is_number(value) and value > 0),
                 f"privacy.dpsgd.{key}={value} is invalid: an epsilon must be > 0 (or null for none), "
                 f"e.g. privacy.dpsgd.{key}=3")
    for partition, value in (dp.client_budgets or {}).items():
        _require(isinstance(partition, int) and 0 <= partition < cfg.clients.num,
                 f"privacy.dpsgd.client_budgets has key {partition!r}: use partition ids in "
                 f"[0, clients.num={cfg.clients.num}), e.g. privacy.dpsgd.client_budgets={{0:2.0}}")
        _require(_is_number(value) and value > 0,
                 f"privacy.dpsgd.client_budgets[{partition}]={value} is invalid: an epsilon budget "
                 "must be > 0")
    if not dp.enabled:
        return
    finite_cap = dp.epsilon_budget is not None or bool(dp.client_budgets)
    _require(dp.target_epsilon is not None or dp.noise_multiplier > 0 or not finite_cap,
             "privacy.dpsgd.noise_multiplier=0 with an epsilon budget: without noise epsilon is "
             "infinite and every client would decline; set a noise multiplier > 0 or target_epsilon")


def _validate_central_dp(cfg: DictConfig, central: DictConfig) -> None:
    _require(central.mode in CENTRAL_DP_MODES,
             f"privacy.central.mode={central.mode} is unknown: choose one of {', '.join(CENTRAL_DP_MODES)}")
    _require(_is_number(central.noise_multiplier) and central.noise_multiplier >= 0,
             f"privacy.central.noise_multiplier={central.noise_multiplier} is invalid: the noise "
             "multiplier must be >= 0, e.g. privacy.central.noise_multiplier=0.1")
    _require(_is_number(central.clipping_norm) and central.clipping_norm > 0,
             f"privacy.central.clipping_norm={central.clipping_norm} is invalid: the clipping norm "
             "must be > 0, e.g. privacy.central.clipping_norm=1.0")
    _require(_is_number(central.target_clipped_quantile) and 0 <= central.target_clipped_quantile <= 1,
             f"privacy.central.target_clipped_quantile={central.target_clipped_quantile} is invalid: "
             "use a value in [0, 1]")
    _require(_is_number(central.clip_norm_lr) and central.clip_norm_lr > 0,
             f"privacy.central.clip_norm_lr={central.clip_norm_lr} is invalid: it must be > 0")
    stddev = central.clipped_count_stddev
    _require(stddev is None or (_is_number(stddev) and stddev >= 0),
             f"privacy.central.clipped_count_stddev={stddev} is invalid: use a value >= 0 or null")
    if central.mode == "none":
        return
    _require(cfg.strategy.name in CENTRAL_DP_STRATEGIES,
             f"privacy.central.mode={central.mode} does not compose with strategy={cfg.strategy.name}: "
             "Flower's DP wrappers clip against the one model sent this round and noise one aggregate, "
             f"while it keeps several models and applies stale updates; use {', '.join(CENTRAL_DP_STRATEGIES)}")
    _require(not (central.mode.startswith("client") and cfg.compression.enabled),
             f"privacy.central.mode={central.mode} does not compose with compression={cfg.compression.name}: "
             "Flower's clipping mods clip the reply's ArrayRecord against the model received and need "
             "the same keys, which a compressed update does not have; use privacy.central.mode=server-fixed "
             "or server-adaptive (the server clips the decoded update)")


def _validate_secagg(cfg: DictConfig, secagg: DictConfig) -> None:
    from fl_server.engine.secagg import SECAGG_STRATEGIES  # need only the weighted average of updates

    if not secagg.enabled:
        return
    _require(cfg.strategy.name in SECAGG_STRATEGIES,
             f"privacy.secagg.enabled=true does not compose with strategy={cfg.strategy.name}: the server "
             "only sees the sum of masked updates, and it needs each client's update; use "
             + " or ".join(SECAGG_STRATEGIES))
    _require(not cfg.privacy.central.mode.startswith("server"),
             f"privacy.secagg.enabled=true does not compose with privacy.central.mode={cfg.privacy.central.mode}: "
             "server-side clipping needs each client's update; use client-fixed or client-adaptive")
    _require(not cfg.compression.enabled,
             f"privacy.secagg.enabled=true does not compose with compression={cfg.compression.name}: "
             "SecAgg+ masks every entry, so a sparse update is sent dense; use compression=none")
    _require(cfg.devices.deadline_s is None,
             f"privacy.secagg.enabled=true needs synchronous rounds, not devices.deadline_s="
             f"{cfg.devices.deadline_s}: a late update cannot join a later round's masked sum")
    _require(cfg.clients.min_train >= 2,
             f"privacy.secagg.enabled=true needs clients.min_train >= 2 (got {cfg.clients.min_train}): "
             "SecAgg+ hides one update among at least two")
    shares, threshold = secagg.num_shares, secagg.reconstruction_threshold
    _require((isinstance(shares, int) and (shares == 1 or shares > 2)) or (isinstance(shares, float) and 0 < shares <= 1),
             f"privacy.secagg.num_shares={shares} is invalid: use a fraction of the sampled clients in "
             "(0, 1] or an integer > 2")
    _require((isinstance(threshold, int) and threshold >= 1) or (isinstance(threshold, float) and 0 < threshold <= 1),
             f"privacy.secagg.reconstruction_threshold={threshold} is invalid: use a fraction of "
             "num_shares in (0, 1] or an integer >= 1")
    _require(_is_number(secagg.clipping_range) and secagg.clipping_range > 0,
             f"privacy.secagg.clipping_range={secagg.clipping_range} is invalid: it must be > 0")
    quant, modulus = secagg.quantization_range, secagg.modulus_range
    _require(isinstance(quant, int) and quant > 0,
             f"privacy.secagg.quantization_range={quant} is invalid: use an integer > 0, e.g. 4194304")
    _require(isinstance(modulus, int) and modulus > quant and bin(modulus).count("1") == 1 and modulus <= 2**32,
             f"privacy.secagg.modulus_range={modulus} is invalid: use a power of 2 above "
             f"quantization_range={quant} and at most 2**32, e.g. 4294967296")


def _validate_task(cfg: DictConfig) -> None:
    """The task's own checks, and the engine features it cannot take (with the reason)."""
    from tasks.registry import TASKS, get_task

    _require(cfg.task.kind in TASKS,
             f"task.kind={cfg.task.kind} is unknown: registered kinds are {', '.join(TASKS)} (tasks/registry.py)")
    task = get_task(str(cfg.task.kind))
    try:
        task.validate(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _require(cfg.strategy.name != "ass" or cfg.task.kind == "image",
             f"strategy=ass weighs clients by per-class accuracy on public data, which task={cfg.task.name} "
             "does not have: use fedavg, fedavgm or staleness_clustered")
    _require(cfg.strategy.name != "krum" or cfg.task.kind != "rl",
             f"strategy=krum does not fit task={cfg.task.name}: Krum scores updates against a Byzantine "
             "model the RL study does not have; use fedavgm (paper 001), fedavg or staleness_clustered")
    _require(not cfg.privacy.dpsgd.enabled or task.dp_sgd_refusal is None,
             f"privacy={cfg.privacy.name} (DP-SGD) does not apply to task={cfg.task.name}: "
             f"{task.dp_sgd_refusal}; use privacy=central (Flower's central DP) or privacy=none")


def _validate_compression(cfg: DictConfig) -> None:
    """Top-k / quantisation settings (conf/compression/)."""
    if "compression" not in cfg:
        return
    c = cfg.compression
    _require(_is_number(c.k) and 0 < c.k <= 1,
             f"compression.k={c.k} is invalid: the top-k fraction must lie in (0, 1] "
             "(0.1 keeps 10 % of each tensor's entries, 1 keeps all), e.g. compression.k=0.1")
    bits = c.quantise_bits
    _require(bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8),
             f"compression.quantise_bits={bits} is invalid: use an integer in 1..8 (uint8 codes), "
             "or null for float32 values")
    for key in ("enabled", "error_feedback", "downlink"):
        _require(isinstance(c[key], bool), f"compression.{key}={c[key]} is invalid: use true or false")


def _validate_fault_handling(cfg: DictConfig) -> None:
    """``clients.min_replies`` / ``round_retries`` and the ``faults`` injection plan."""
    c = cfg.clients
    min_replies = c.min_replies
    _require(min_replies is None or (isinstance(min_replies, int) and 1 <= min_replies <= c.min_train),
             f"clients.min_replies={min_replies} is invalid: use an integer in [1, clients.min_train="
             f"{c.min_train}] (a round samples at least min_train clients; raise min_train first), or null")
    retries = c.round_retries
    _require(isinstance(retries, int) and 0 <= retries <= 10,
             f"clients.round_retries={retries} is invalid: use an integer in [0, 10]")
    if "faults" not in cfg:
        return
    from fl_common.faults import FAULT_KINDS

    unknown = sorted(set(cfg.faults.fraction) - set(FAULT_KINDS))
    _require(not unknown, f"faults.fraction.{unknown[0] if unknown else ''} is unknown: the kinds are "
             f"{', '.join(FAULT_KINDS)}")
    per_round = []
    for kind in FAULT_KINDS:
        value = cfg.faults.fraction.get(kind, 0.0)
        values = [value] if _is_number(value) else list(value) if OmegaConf.is_list(value) else [value]
        _require(values and all(_is_number(v) and 0 <= v <= 1 for v in values),
                 f"faults.fraction.{kind}={value} is invalid: use a fraction in [0, 1] or a list of "
                 f"them (one per round), e.g. faults.fraction.{kind}=0.2")
        per_round.append(values)
    rounds = max(len(v) for v in per_round)
    worst = max(sum(v[min(r, len(v) - 1)] for v in per_round) for r in range(rounds))
    _require(worst <= 1 + 1e-9,
             f"faults.fraction adds up to {worst:g} in some round: the kinds take disjoint shares of "
             "the clients, so their sum must be <= 1")
    _require(_is_number(cfg.faults.hang_s) and cfg.faults.hang_s >= 0,
             f"faults.hang_s={cfg.faults.hang_s} is invalid: use seconds >= 0")
    _require(_is_number(cfg.faults.scale_factor),
             f"faults.scale_factor={cfg.faults.scale_factor} is invalid: use a number, e.g. -5")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_run_name(cfg: DictConfig) -> str:
    """A short, human-readable run name for MLflow and the progress display (the task's)."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    from fl_server.experiments.topology import run_name_suffix
    from tasks.registry import task_of

    return task_of(cfg).run_name(cfg) + run_name_suffix(cfg)
