"""Federated workload forecasting: the data view, the bad-input errors, the
experiment with real client code through a fake Grid, and one real Flower
simulation through the launcher."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from mlflow.tracking import MlflowClient

from fl_clients import app as client_app
from fl_datasets.forecast_data import ForecastSpec, build_forecast_data, build_site, clear_caches, site_layout
from fl_datasets.traces import TraceError
from fl_server.experiments.config import ConfigError, compose_config
from fl_server.experiments.experiment import run_experiment
from tests.conftest import GWA_DIR, requires_gwa, run_module, sqlite_uri
from tests.fake_grid import FakeGrid

# Small synthetic series: 6 days of 300 s steps, a 4-hour window, 30 min ahead.
SMALL = ["task=workload", "task.synthetic.num_steps=1728", "task.window=48", "task.horizon=6",
         "task.season=48", "task.train_stride=4", "clients.num=4", "num_rounds=2", "seed=3"]


def small_spec(**changes) -> ForecastSpec:
    fields = dict(num_clients=3, window=48, horizon=6, season=48, synthetic_steps=1728, train_stride=4, seed=3)
    return ForecastSpec(**{**fields, **changes})


# ------------------------------------------------------------------ data view


def test_sites_are_split_in_time_and_normalised_on_their_training_slice_only():
    # Prepare: 1728 steps -> train [0, 1210), val [1210, 1469), test [1469, 1728)
    spec = small_spec()
    # Execute
    data = build_forecast_data(spec)
    # Assert
    assert len(data.sites) == 3 and data.site_ids() == ["0", "1", "2"]
    site = data.sites[0]
    raw = site.normaliser.inverse_transform(site.train[0][0])  # first training window, in units
    np.testing.assert_allclose(raw[:, 0], site.y_train[:48, 0], rtol=1e-5)
    assert site.normaliser.mean[0, 0] == pytest.approx(np.mean(site.y_train[:, 0]))
    # windows per split: (len - W - H + 1) origins, training ones at stride 4
    assert len(site.test[0]) == 259 - 48 - 6 + 1
    assert len(site.train[0]) == len(range(0, 1210 - 48 - 6 + 1, 4))
    # the last training target ends before the first validation input starts
    assert site.train[1].shape == (len(site.train[0]), 6, 1)


def test_same_spec_same_arrays_and_the_trace_cache_round_trips(monkeypatch, tmp_path):
    if not GWA_DIR.is_dir():
        pytest.skip(f"real GWA-T-12 traces not found at {GWA_DIR} (../shared/data absent)")
    monkeypatch.setenv("FEDCONTINUUM_CACHE_DIR", str(tmp_path))
    spec = small_spec(trace_dir=str(GWA_DIR), window=288, horizon=12, season=288, train_stride=64)
    parsed = build_forecast_data(spec)  # parses the CSV files, writes the cache
    clear_caches()
    cached = build_forecast_data(spec)  # reads the npz
    assert list(tmp_path.glob("traces-*.npz"))
    assert parsed.site_ids() == cached.site_ids() == ["306", "392", "407"]  # the 3 busiest VMs
    for a, b in zip(parsed.sites, cached.sites):
        np.testing.assert_array_equal(a.test[0], b.test[0])
        np.testing.assert_array_equal(a.y_train, b.y_train)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task.window=0"], r"task.window=0 is invalid"),
        (["task.horizon=-1"], r"task.horizon=-1 is invalid"),
        (["task.season=400"], r"task.season=400 is longer than task.window=288"),
        (["task.model=gru"], r"task.model=gru is unknown"),
        (["strategy=ass"], r"strategy=ass weighs clients by per-class accuracy"),
        (["task=bitbrains", "task.trace_dir=/nonexistent/month"], r"task.trace_dir=/nonexistent/month does not exist"),
    ],
)
def test_bad_forecast_config_is_one_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_config(["task=workload", *overrides])


def test_an_empty_trace_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no \*.csv traces"):
        compose_config(["task=bitbrains", f"task.trace_dir={tmp_path}"])


def test_a_window_longer_than_a_split_names_both_sizes():
    with pytest.raises(ValueError, match=r"window \+ task.horizon = 288 \+ 12 steps is longer than the shortest split"):
        build_forecast_data(small_spec(window=288, horizon=12, season=48))


@requires_gwa
def test_more_clients_than_trace_sites_is_refused():
    with pytest.raises(TraceError, match=r"clients.num=40 but the traces hold only 32 sites"):
        build_forecast_data(small_spec(num_clients=40, trace_dir=str(GWA_DIR), window=288, horizon=12, season=288))


# ---------------------------------------------------- experiment, fake Grid


def forecast_client(num_partitions: int = 4):
    contexts: dict[int, Context] = {}  # per node, kept across rounds as Flower keeps context.state

    def reply(message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = contexts.setdefault(node, Context(
            run_id=1, node_id=node, node_config={"partition-id": node, "num-partitions": num_partitions},
            state=RecordDict(), run_config={}))
        if message.metadata.message_type == MessageType.QUERY:
            return client_app.query(message, context)
        if message.metadata.message_type == MessageType.EVALUATE:
            return client_app.evaluate_local(message, context)
        return client_app.train(message, context)

    return reply


def test_federated_forecasting_logs_per_site_and_overall_metrics_every_round(tracking_uri):
    # Prepare
    cfg = compose_config([*SMALL, "clients.fraction_evaluate=0.5"])
    # Execute
    final = run_experiment(FakeGrid(range(4), forecast_client()), cfg, tracking_uri)
    # Assert
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kind"] == "forecast" and run.data.tags["model"] == "tcn"
    # what the MLflow UI lists: the sites' windows as data-set inputs, the forecaster as a logged model
    contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert contexts == {"train: 4 sites, cpu_usage_pct", "eval"}
    assert [m.name for m in client.search_logged_models([run.info.experiment_id])] == ["global-model"]
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    for metric in ("mae", "rmse", "smape", "mase"):
        assert [s for s, _ in history(f"test_{metric}")] == [0, 1, 2]
        for site in range(4):
            assert [s for s, _ in history(f"site{site}_test_{metric}")] == [0, 1, 2]
        # overall = mean over the sites
        overall = history(f"test_{metric}")[-1][1]
        sites = [history(f"site{s}_test_{metric}")[-1][1] for s in range(4)]
        assert overall == pytest.approx(np.mean(sites))
        assert [s for s, _ in history(f"baseline_seasonal_naive_test_{metric}")] == [0, 2]
        assert [s for s, _ in history(f"baseline_last_value_test_{metric}")] == [0, 2]
    mase = history("test_mase")
    assert mase[-1][1] < mase[0][1]  # training helps
    assert final["test_mase"] == pytest.approx(mase[-1][1])
    assert [s for s, _ in history("fed_val_mase")] == [1, 2]  # clients score their validation tails
    assert [s for s, _ in history("fed_test_mase_h6")] == [1, 2]  # ... and test tails, per horizon step
    assert history("virtual_time_s")[-1][1] > 0
    artifacts = {a.path for d in ("report", "plots", "data") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"report/site_metrics.md", "plots/mase_vs_round.png", "plots/test_forecasts.png",
            "data/client_sites.csv", "data/client_devices.csv"} <= artifacts


def test_a_client_cuts_only_its_own_sites_windows_and_they_equal_the_full_views():
    spec = small_spec(num_clients=4)
    full = build_forecast_data(spec)
    for client in (0, 3):
        own = build_site(spec, client)
        assert own.site == full.sites[client].site
        for split in ("train", "val", "test"):
            for a, b in zip(getattr(own, split), getattr(full.sites[client], split)):
                np.testing.assert_array_equal(a, b)
    layout = site_layout(spec)  # counts without cutting windows
    assert layout.site_ids == tuple(full.site_ids())
    assert layout.windows == tuple((len(s.train[0]), len(s.val[0]), len(s.test[0])) for s in full.sites)
    subset = build_forecast_data(spec, (1, 3))
    assert subset.site_ids() == ["1", "3"]


def test_above_eval_sites_the_server_scores_a_fixed_sample_but_weighs_every_client():
    # Prepare: 6 clients, the server scores 2 of them
    from fl_common.per_client import sample_clients
    from tasks.forecast.server import ForecastServer

    cfg = compose_config([*SMALL, "clients.num=6", "task.eval_sites=2"])
    full = build_forecast_data(ForecastSpec.from_config(cfg))
    # Execute
    server = ForecastServer(cfg)
    metrics = server.evaluate(0, server.initial_arrays())
    # Assert: the same fixed sample every run, only those sites' keys, every client's size
    scored = sample_clients(6, 2)
    assert server.eval_clients == scored and len(scored) == 2
    assert server.data.site_ids() == [full.sites[i].site for i in scored]
    assert {k.split("_")[0] for k in metrics if k.startswith("site")} == {f"site{full.sites[i].site}" for i in scored}
    assert server.client_sizes == [len(site) for site in full.sites]
    every = ForecastServer(compose_config([*SMALL, "clients.num=6", "task.eval_sites=null"]))
    assert every.eval_clients is None and len(every.data.sites) == 6


def test_forecasting_with_fedavgm_and_an_lstm_runs(tracking_uri):
    cfg = compose_config([*SMALL, "strategy=fedavgm", "task.model=lstm", "num_rounds=1"])
    final = run_experiment(FakeGrid(range(4), forecast_client()), cfg, tracking_uri)
    assert np.isfinite(final["test_mase"])


def test_forecaster_flops_match_torch_flop_counter():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.forecast.models import build_forecaster, forecaster_costs

    for quantiles in ((), (0.1, 0.5, 0.9)):
        flops, params, _ = forecaster_costs("tcn", 1, 288, 12, 1, quantiles)
        model = build_forecaster("tcn", 1, 12, level_steps=1, quantiles=quantiles)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 288, 1))
        assert flops == counter.get_total_flops()
        assert params == sum(p.numel() for p in model.parameters())


def test_compare_script_tables_hand_computed():
    from scripts.forecast_compare import PERSISTENCE, horizon_markdown, overall, persistence_verdict, site_markdown

    site = lambda mase: {"mae_h1": 1.0, "smape_h1": 3.0, "mase_h1": mase}  # noqa: E731
    fed = [overall({"a": site(0.5), "b": site(0.7)}), overall({"a": site(0.7), "b": site(0.9)})]
    results = {"federated": fed, PERSISTENCE: [overall({"a": site(1.0), "b": site(1.0)})],
               "ETS (statsmodels, tuned on val)": [overall({"a": site(0.5), "b": site(0.7)})]}
    table = horizon_markdown(results, 1, 300, {"federated": 10})
    # overall MASE per seed: 0.6 and 0.8 -> mean 0.7, sd (ddof=1) 0.141; skill vs persistence (1.0): 0.3;
    # vs the best baseline (ETS, 0.6): 1 - 0.6/0.6 = 0 and 1 - 0.8/0.6 = -0.333 -> -0.167 ± 0.236
    assert "best baseline: ETS" in table
    assert "| federated | 2 | 10 | 0.700 ± 0.141 | 1.00 ± 0.00 | 3.0 ± 0.0 | 0.300 ± 0.141 | -0.167 ± 0.236 |" in table
    sites = {"federated": [{"a": site(0.5), "b": site(1.2)}], PERSISTENCE: [{"a": site(1.0), "b": site(1.0)}]}
    assert "| a | 0.500 | 1.000 |" in site_markdown(sites, "mase_h1")
    verdict = persistence_verdict(results, sites, [1], 300)
    assert "5 min: last value MASE 1.000; best trained: federated 0.700; every trained method beats persistence" in verdict
    assert "persistence is as good or better on 1 of 2 sites (b)" in verdict


# ----------------------------------------------------------- real Flower run


@pytest.mark.e2e
def test_a_real_flower_simulation_trains_the_forecaster_per_site(tmp_path):
    uri = sqlite_uri(tmp_path)
    result = run_module("fl_server.runtime.launch", *SMALL, "clients.num=3", env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "MASE" in result.stdout and "s-naive MASE" in result.stdout  # forecasting summary columns
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "clients_replied")] == [3, 3]
    assert {f"site{s}_test_mase" for s in range(3)} <= set(run.data.metrics)


# ------------------------------------------------------------ DP-SGD (Opacus)


def test_dp_sgd_forecasting_reports_each_sites_epsilon_and_respects_the_budget(tracking_uri):
    # Prepare: a budget one round of DP-SGD fits in but two do not. 290 windows
    # per site, batch 64: Opacus samples at q = 1/ceil(290/64) = 0.2, 5 steps per
    # round; sigma 1.0, delta 1e-5 -> RDP epsilon 4.544 after one round, 5.754 after two.
    cfg = compose_config([*SMALL, "privacy=dpsgd", "privacy.dpsgd.epsilon_budget=5.5"])
    # Execute
    final = run_experiment(FakeGrid(range(4), forecast_client()), cfg, tracking_uri)
    # Assert
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and np.isfinite(final["test_mase"])
    eps = {p: [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"epsilon_p{p}"),
                                       key=lambda m: m.step)] for p in range(4)}
    declined = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "clients_declined"),
                                        key=lambda m: m.step)]
    assert all(e[0] == pytest.approx(4.5445, abs=1e-4) for e in eps.values())
    assert all(e[-1] <= 5.5 for e in eps.values())  # never beyond the budget
    assert declined[0] == 0 and declined[-1] == 4  # round 2 would exceed it: every site declines


def test_dp_sgd_with_an_lstm_is_refused():
    with pytest.raises(ConfigError, match=r"privacy=dpsgd with task.model=lstm"):
        compose_config(["task=workload", "task.model=lstm", "privacy=dpsgd"])
