"""Wall-time overhead of fedcontinuum against a plain Flower FedAvg app.

    python -m scripts.bench_overhead [--repeats N] [--warmup N]

Both variants do the same training (MNIST 5k, 3,800-sample IID pool over 10
clients, the same CNN and initial weights, SGD lr 0.05 momentum 0.9, batch 32,
1 local epoch, 10 rounds, central evaluation on the same 1,000-image test set)
on a SuperLink of their own, started and stopped inside the timed span:

* ``platform``: ``python -m fl_server.launch --verbose`` (default config),
  the whole command;
* ``plain``: ``LocalSuperLink`` + ``flwr run scripts/bench/plain_fedavg
  fedcontinuum --stream`` (``scripts/bench/plain_fedavg``: the ``flwr new``
  PyTorch template's shape, ``FedAvg.start``; no Hydra, no MLflow).

First one untimed run of each variant (``--warmup``: the first run after an
install reads torch's and Ray's libraries from disk). Repeats alternate the
order (platform first in even repeats, plain first in odd ones). Per run we record

* ``wall``: the whole command, SuperLink start and stop included;
* ``pre-run``: command start -> "Successfully started run" (imports, config,
  data preflight, SuperLink start, FAB build and submission);
* ``in run``: "Successfully started run" -> end of the ``flwr run`` stream;
* ``post-run``: the rest (status check, log upload, SuperLink stop, exit);
* ``round``: mean in-app time of rounds 2..10 (platform: its markers'
  ``round_wall_time_s`` = configure -> aggregate -> central evaluation;
  plain: the server's clock between consecutive central evaluations);
* ``cycle``: (arrival of round 10's line - arrival of round 1's line) / 9,
  measured the same way for both from the stream (which arrives in
  ~0.5 s polls, so +-0.06 s);
* the final central test accuracy.

Raw logs and a JSON of all measurements go to ``outputs/bench/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fl_server.experiments import progress
from fl_server.experiments.config import PROJECT_DIR
from fl_server.runtime.superlink import CONNECTION, LocalSuperLink, SuperLinkError

PLAIN_APP = Path("scripts") / "bench" / "plain_fedavg"
PLAIN_MARKER = "[plain-fedavg] "
PLAIN_FEDERATION_CONFIG = "num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
OUT_DIR = PROJECT_DIR / "outputs" / "bench"
NUM_ROUNDS = 10
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_PLAIN_FINAL = re.compile(r"Final central accuracy after \d+ rounds: ([0-9.]+)")
# the launcher's progress bar, printed once right after `flwr run` has exited
_LAUNCHER_BAR = re.compile(r"━.*\b\d+/\d+\b")


@dataclass
class Measurement:
    variant: str
    repeat: int
    ok: bool = False
    status: str = ""
    wall_s: float = float("nan")
    pre_run_s: float = float("nan")
    in_run_s: float = float("nan")
    round_s: float = float("nan")
    cycle_s: float = float("nan")
    accuracy: float = float("nan")
    flower_run_id: int | None = None
    log_path: str = ""
    round_times: list[float] = field(default_factory=list)


@dataclass
class Stream:
    """A child's merged output, each line with its arrival time (perf_counter)."""

    returncode: int
    lines: list[tuple[float, str]]
    exited_at: float
    timed_out: bool


def _stream(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float, interrupt: bool) -> Stream:
    """Run ``command`` in its own process group, timestamping every output line.

    On timeout the group gets SIGINT (``interrupt``: lets the launcher stop its
    SuperLink) or SIGTERM, then SIGKILL.
    """
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(
        command,
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )

    def read() -> None:
        assert proc.stdout is not None
        with log_path.open("w") as log:
            for line in proc.stdout:
                now = time.perf_counter()
                lines.append((now, line.rstrip("\n")))
                log.write(f"{now:.3f} {line}")
                log.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc, interrupt)
    except BaseException:
        # Ctrl-C or a SIGTERM of the bench itself: stop the job too, or its SuperLink outlives us
        _stop_group(proc, interrupt)
        raise
    exited_at = time.perf_counter()
    reader.join(timeout=10)
    return Stream(proc.returncode, lines, exited_at, timed_out)


def _stop_group(proc: subprocess.Popen, interrupt: bool) -> None:
    """SIGINT (``interrupt``: the launcher then stops its SuperLink) or SIGTERM to the job's group, then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGINT if interrupt else signal.SIGTERM)
        # the launcher stops its SuperLink (own session) and Ray before it exits: under load that took > 30 s
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _started_at(stream: Stream) -> tuple[float | None, int | None]:
    for t, line in stream.lines:
        if match := _RUN_ID.search(line):
            return t, int(match.group(1))
    return None, None


def _events(stream: Stream, marker: str) -> list[tuple[float, dict]]:
    out = []
    for t, line in stream.lines:
        at = line.find(marker)
        if at < 0:
            continue
        try:
            out.append((t, json.loads(line[at + len(marker) :])))
        except json.JSONDecodeError:
            pass
    return out


def _cycle(arrivals: dict[int, float]) -> float:
    """Mean duration of rounds 2..N from the arrival times of rounds 1 and N."""
    if 1 in arrivals and NUM_ROUNDS in arrivals:
        return (arrivals[NUM_ROUNDS] - arrivals[1]) / (NUM_ROUNDS - 1)
    return float("nan")


def run_platform(repeat: int, out_dir: Path, timeout_s: float) -> Measurement:
    m = Measurement("platform", repeat)
    log_path = out_dir / f"platform-{repeat}.log"
    m.log_path = str(log_path)
    # COLUMNS: rich must not wrap the echoed marker lines; unbuffered: lines arrive when printed
    env = {**os.environ, "COLUMNS": "4000", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    stream = _stream([sys.executable, "-m", "fl_server.runtime.launch", "--verbose"], env, log_path, timeout_s, interrupt=True)
    m.wall_s = stream.exited_at - started
    run_started, m.flower_run_id = _started_at(stream)
    events = [(t, e) for t, e in _events(stream, progress.MARKER) if t >= (run_started or 0.0)]
    finished = [e for _, e in events if e.get("kind") == "finished"]
    rounds = {int(e["round"]): (t, e) for t, e in events if e.get("kind") == "round"}
    if finished:
        m.accuracy = float(finished[-1].get("test_accuracy", float("nan")))
    m.round_times = [float(rounds[r][1]["round_wall_time_s"]) for r in range(2, NUM_ROUNDS + 1)
                     if r in rounds and "round_wall_time_s" in rounds[r][1]]
    if len(m.round_times) == NUM_ROUNDS - 1:
        m.round_s = statistics.fmean(m.round_times)
    m.cycle_s = _cycle({r: t for r, (t, _) in rounds.items()})
    if run_started is not None:
        bar = [t for t, line in stream.lines if t > run_started and progress.MARKER not in line and _LAUNCHER_BAR.search(line)]
        table = [t for t, line in stream.lines if t > run_started and "fedcontinuum runs" in line]
        stream_end = bar[0] if bar else (table[0] if table else None)
        m.pre_run_s = run_started - started
        if stream_end is not None:
            m.in_run_s = stream_end - run_started
    m.ok = stream.returncode == 0 and bool(finished) and not stream.timed_out
    m.status = "ok" if m.ok else ("timed out" if stream.timed_out else f"exit {stream.returncode}")
    return m


def run_plain(repeat: int, out_dir: Path, timeout_s: float, federation_config: str) -> Measurement:
    m = Measurement("plain", repeat)
    log_path = out_dir / f"plain-{repeat}.log"
    m.log_path = str(log_path)
    started = time.perf_counter()
    stream: Stream | None = None
    try:
        with LocalSuperLink() as superlink:
            command = superlink.flwr(
                "run", str(PLAIN_APP), CONNECTION, "--stream", "--federation-config", federation_config
            )
            stream = _stream(command, superlink.env, log_path, timeout_s, interrupt=False)
            run_started, m.flower_run_id = _started_at(stream)
            if m.flower_run_id is not None:
                m.status = superlink.run_status(m.flower_run_id)
            else:
                m.status = f"flwr run exited {stream.returncode} before starting a run"
    except SuperLinkError as err:
        m.status = f"superlink: {err}"
    m.wall_s = time.perf_counter() - started
    if stream is None:
        return m
    if run_started is not None:
        m.pre_run_s = run_started - started
        m.in_run_s = stream.exited_at - run_started
    events = _events(stream, PLAIN_MARKER)
    evals = {int(e["round"]): (t, e) for t, e in events if e.get("kind") == "eval"}
    finished = [e for _, e in events if e.get("kind") == "finished"]
    if finished:
        m.accuracy = float(finished[-1]["test_accuracy"])
    else:
        for _, line in stream.lines:
            if match := _PLAIN_FINAL.search(line):
                m.accuracy = float(match.group(1))
    clock = {r: float(e["t"]) for r, (_, e) in evals.items()}
    m.round_times = [clock[r] - clock[r - 1] for r in range(2, NUM_ROUNDS + 1) if r in clock and r - 1 in clock]
    if len(m.round_times) == NUM_ROUNDS - 1:
        m.round_s = statistics.fmean(m.round_times)
    m.cycle_s = _cycle({r: t for r, (t, _) in evals.items()})
    m.ok = m.status == "finished:completed" and bool(finished) and not stream.timed_out
    return m


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def _sd(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _f(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def summary(results: list[Measurement], repeats: int) -> tuple[Table, dict[str, dict[str, float]]]:
    stats: dict[str, dict[str, float]] = {}
    for variant in ("platform", "plain"):
        ok = [m for m in results if m.variant == variant and m.ok]
        stats[variant] = {
            "n": len(ok),
            "wall": _mean([m.wall_s for m in ok]),
            "wall_sd": _sd([m.wall_s for m in ok]),
            "pre_run": _mean([m.pre_run_s for m in ok]),
            "in_run": _mean([m.in_run_s for m in ok]),
            "post_run": _mean([m.wall_s - m.pre_run_s - m.in_run_s for m in ok]),
            "round": _mean([m.round_s for m in ok]),
            "cycle": _mean([m.cycle_s for m in ok]),
            "accuracy": _mean([m.accuracy for m in ok]),
            # what a run pays besides its rounds: the whole command minus 10 rounds at the streamed cycle time
            "fixed": _mean([m.wall_s - NUM_ROUNDS * m.cycle_s for m in ok]),
        }
    base = stats["plain"]
    table = Table(title=f"fedcontinuum overhead vs plain Flower FedAvg ({repeats} repeats, alternating)", title_justify="left")
    for name in ("variant", "repeats", "wall s (mean ± sd)", "pre-run s", "in run s", "post-run s", "round s", "cycle s",
                 "fixed s", "accuracy", "wall ratio"):
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
    for variant, s in stats.items():
        ratio = s["wall"] / base["wall"] if base["wall"] == base["wall"] and base["wall"] > 0 else float("nan")
        table.add_row(
            variant,
            f"{s['n']}/{repeats}",
            f"{_f(s['wall'])} ± {_f(s['wall_sd'])}",
            _f(s["pre_run"]),
            _f(s["in_run"]),
            _f(s["post_run"]),
            _f(s["round"], 3),
            _f(s["cycle"], 3),
            _f(s["fixed"]),
            _f(s["accuracy"], 4),
            _f(ratio, 3),
        )
    return table, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take (default 600)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs of each variant first (default 1): the first process after an install or "
                             "a quiet spell reads torch's and Ray's libraries from disk, and would charge that to "
                             "whichever variant runs first")
    parser.add_argument(
        "--plain-federation-config",
        default=PLAIN_FEDERATION_CONFIG,
        help=f'the plain run\'s --federation-config (default "{PLAIN_FEDERATION_CONFIG}")',
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    # SIGTERM unwinds like Ctrl-C, so the running job's group and the plain variant's SuperLink are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    console = Console()
    if not console.is_terminal:  # logs and pipes: keep the table on one line per row
        console = Console(width=160)
    out_dir = OUT_DIR / f"{datetime.now():%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for warmup in range(args.warmup):
        for variant in ("platform", "plain"):
            console.print(f"[bold]warm-up {warmup + 1}/{args.warmup}: {variant}[/bold] (not timed) …", highlight=False)
            run = run_platform if variant == "platform" else partial(run_plain, federation_config=args.plain_federation_config)
            m = run(-1 - warmup, out_dir, args.timeout)
            if not m.ok:
                console.print(f"  {m.status} (log: {m.log_path})", highlight=False)
                return 1
    results: list[Measurement] = []
    for repeat in range(args.repeats):
        order = ("platform", "plain") if repeat % 2 == 0 else ("plain", "platform")
        for variant in order:
            console.print(f"[bold]repeat {repeat + 1}/{args.repeats}: {variant}[/bold] …", highlight=False)
            if variant == "platform":
                m = run_platform(repeat, out_dir, args.timeout)
            else:
                m = run_plain(repeat, out_dir, args.timeout, args.plain_federation_config)
            results.append(m)
            console.print(
                f"  {m.status}: wall {_f(m.wall_s)} s, pre-run {_f(m.pre_run_s)} s, in run {_f(m.in_run_s)} s, "
                f"round {_f(m.round_s, 3)} s, cycle {_f(m.cycle_s, 3)} s, accuracy {_f(m.accuracy, 4)}  "
                f"(log: {m.log_path})",
                highlight=False,
            )
    table, stats = summary(results, args.repeats)
    console.print(table)
    plat, plain = stats["platform"], stats["plain"]
    if plat["n"] and plain["n"]:
        ratio = plat["wall"] / plain["wall"]
        verdict = "[green]within[/green]" if ratio <= 1.10 else "[red]over[/red]"
        console.print(
            f"platform/plain wall time: {ratio:.3f} (+{(ratio - 1) * 100:.1f} %), {verdict} the 10 % bar; "
            f"in run {plat['in_run'] / plain['in_run']:.3f}, round {plat['round'] / plain['round']:.3f}, "
            f"cycle {plat['cycle'] / plain['cycle']:.3f}; fixed cost (wall - {NUM_ROUNDS} cycles) "
            f"{plat['fixed']:.1f} s / {plain['fixed']:.1f} s = {plat['fixed'] / plain['fixed']:.3f}"
        )
    (out_dir / "results.json").write_text(
        json.dumps({"runs": [asdict(m) for m in results], "summary": stats}, indent=2, default=float)
    )
    console.print(f"logs and results.json: {out_dir}", highlight=False)
    return 0 if all(m.ok for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
