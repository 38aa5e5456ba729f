"""plain-fedavg ServerApp: FedAvg.start with a central evaluation each round."""

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from plain_fedavg_app.task import load_test, new_model, test

MARKER = "[plain-fedavg] "

app = ServerApp()


def _emit(kind: str, **payload) -> None:
    print(MARKER + json.dumps({"kind": kind, **payload}), flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)  # as fedcontinuum's server: it shares the CPUs with the clients
    num_rounds = int(context.run_config["num-server-rounds"])
    lr = float(context.run_config["lr"])

    model = new_model()
    eval_model = new_model()

    def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(eval_model, load_test())
        _emit("eval", round=server_round, accuracy=accuracy, loss=loss, t=time.time())
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=10)
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=central_eval,
    )
    final = result.evaluate_metrics_serverapp[num_rounds]
    accuracy = float(final["accuracy"])
    print(f"Final central accuracy after {num_rounds} rounds: {accuracy:.4f}", flush=True)
    _emit("finished", test_accuracy=accuracy, wall_time_s=time.perf_counter() - started)
