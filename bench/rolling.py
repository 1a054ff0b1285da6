"""Rolling upgrade: every process stopped on purpose and restarted under load,
against the same stops as crashes, in the same run.

``python -m bench.rolling [--quick]`` starts 2 brokers, 3 null workers paced
like a model (each registered with both brokers, resumable: token i is id i)
and a gateway, and keeps 32 callers streaming chat completions through a
load balancer of its own (it sends to the gateways whose ``/ready`` is 200,
probed every 0.1 s, as a cloud load balancer or a Kubernetes Service would).
Then, in the same run:

* **planned** (a rolling upgrade, as an orchestrator does it): each broker
  SIGTERMed (it says goodbye) and restarted on its ports, each worker
  SIGTERMed (it drains: a grace shorter than the streams, so they are
  handed over) and restarted, then the gateway replaced (a new one started,
  the old one SIGTERMed: it fails ``/ready`` and drains), one at a time,
  each only once the one before is back;
* **crash** (the baseline): a worker SIGKILLed (the broker notices after
  interval x liveness; its streams resume), a broker SIGKILLed (its
  clients see the connection close) and a broker SIGSTOPped (silent, as a
  host that vanished: its clients wait out interval x liveness), each
  restarted the same way.

For each stop: errors reaching callers, streams not exact, and the longest
stall any stream saw between two tokens while it happened. Writes
bench/results/rolling.json and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.common import run_and_report
from zserve.client import Client
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for, zserve_cmd

INTERVAL, LIVENESS = 1.0, 3  # the defaults
EXPIRY = INTERVAL * LIVENESS
Step = tuple[str, Callable[[], None], Callable[[], None], Callable[[], None]]


def _nothing() -> None:
    pass


@dataclass
class Settings:
    callers: int = 32  # concurrent streams
    tokens: int = 100  # per request
    token_delay: float = 0.02  # seconds per token (2 s a request)
    drain_timeout: float = 1.0  # the workers' grace: shorter than a request
    settle: float = 1.0  # seconds of plain load between steps
    # After a process stopped, seconds of load before it restarts: a stall
    # is the longest gap between tokens from the stop to the end of this
    # (a SIGKILLed worker's streams move after interval x liveness).
    tail: float = EXPIRY + 0.5
    crash: bool = True  # the crash baseline too
    # "null" (paced like a model: token i is id i) or "hf" on ``model_dir``
    # (greedy, float32: a stream continued from its ids is exact too)
    engine: str = "null"
    model_dir: str | None = None
    worker_args: tuple[str, ...] = ()  # more options for each worker


FULL = Settings()
QUICK = Settings(settle=0.5)


def want(n: int) -> str:
    return "".join(f"t{i} " for i in range(n))


def chat_body(tokens: int, sampling: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    """Every caller's request (and the reference run's, unstreamed)."""
    return {"model": "m", "stream": stream, "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}], **sampling}  # fmt: skip


@dataclass
class Load:
    """Callers streaming through the gateways that are ready."""

    backends: list[str] = field(default_factory=list)  # gateway roots, probed
    want: str | None = None  # every stream's text; None: the null engine's
    sampling: dict[str, Any] = field(default_factory=dict)  # added to each body
    ready: list[str] = field(default_factory=list)
    done: int = 0
    exact: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # (monotonic time of the later token, gap) for every gap between tokens
    gaps: list[tuple[float, float]] = field(default_factory=list)
    running: bool = True
    reconnects: int = 0  # requests sent again after a refused connection

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def probe(self, http: httpx.AsyncClient) -> None:
        while self.running:
            ok = []
            for root in list(self.backends):
                try:
                    if (await http.get(root + "/ready", timeout=1)).status_code == 200:
                        ok.append(root)
                except httpx.HTTPError:
                    pass
            self.ready = ok
            await asyncio.sleep(0.1)

    async def caller(self, http: httpx.AsyncClient, tokens: int) -> None:
        body = chat_body(tokens, self.sampling)
        expected = want(tokens) if self.want is None else self.want
        while self.running:
            if not self.ready:  # no gateway ready: the balancer holds it
                await asyncio.sleep(0.02)
                continue
            root = random.choice(self.ready)
            text: list[str] = []
            last = 0.0
            try:
                async with http.stream("POST", root + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        raw = await r.aread()
                        try:  # the error's code names the cause (timeout, worker_lost...)
                            code = json.loads(raw)["error"]["code"]
                        except (ValueError, KeyError, TypeError):
                            code = "?"
                        self.error(f"http {r.status_code} {code}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            self.error(str(chunk["error"].get("code")))
                            break
                        content = chunk["choices"][0]["delta"].get("content")
                        if content:
                            now = time.monotonic()
                            if last:
                                self.gaps.append((now, now - last))
                            last = now
                            text.append(content)
            except httpx.ConnectError:
                # nothing was sent (a listener closed since the last probe):
                # a load balancer tries the request on another backend
                self.reconnects += 1
                continue
            except httpx.HTTPError as e:
                self.error(type(e).__name__)
                continue
            self.done += 1
            self.exact += "".join(text) == expected


class Rolling:
    """2 brokers on fixed ports, 3 workers on both (paced null, or hf),
    gateways."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.eps = [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
                    for _ in range(2)]  # fmt: skip
        self.brokers: list[Proc] = []
        self.workers: list[Proc] = []
        self.gateways: list[tuple[Proc, str]] = []
        try:
            for i in range(2):
                self.brokers.append(self._broker(i))
            for _ in range(3):
                self.workers.append(self._worker())
            self.wait_workers()
            self.gateways.append(self._gateway())
        except BaseException:
            self.stop()
            raise

    @property
    def frontends(self) -> list[str]:
        return [fe for fe, _ in self.eps]

    def _broker(self, i: int) -> Proc:
        fe, be = self.eps[i]
        return start_broker(frontend=fe, backend=be)[0]

    def _worker(self) -> Proc:
        s = self.s
        if s.engine == "hf":
            assert s.model_dir, "the hf engine needs Settings.model_dir"
            engine = ["--engine", "hf", "--model", s.model_dir, "--model-names", "m",
                      "--dtype", "float32", "--capacity", "16"]  # fmt: skip
        else:
            engine = ["--engine", "null", "--model", "m", "--capacity", "64",
                      "--token-delay", str(s.token_delay)]  # fmt: skip
        return start_worker(
            ",".join(be for _, be in self.eps), *engine, "--drain-timeout", str(s.drain_timeout),
            *s.worker_args,
        )  # fmt: skip

    def load(self) -> Load:
        """Callers through the first gateway; on hf, greedy, each text checked
        against one uninterrupted request made first."""
        root = self.gateways[0][1]
        if self.s.engine != "hf":
            return Load(backends=[root])
        sampling = {"temperature": 0, "ignore_eos": True}
        body = chat_body(self.s.tokens, sampling, stream=False)
        r = httpx.post(root + "/v1/chat/completions", json=body, timeout=120)
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        return Load(backends=[root], want=text, sampling=sampling)

    def _gateway(self) -> tuple[Proc, str]:
        port = free_port()
        proc = Proc(zserve_cmd(
            "gateway", "--broker", ",".join(self.frontends), "--port", str(port),
            "--log-level", "warning", "--drain-delay", "2", "--drain-timeout", "30",
        ), name="gateway")  # fmt: skip
        root = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"gateway exited with {proc.popen.returncode}")
            try:
                return httpx.get(root + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "the gateway to be ready")
        return proc, root

    def wait_workers(self) -> None:
        """Until every broker holds every worker (by pid)."""
        pids = {w.pid for w in self.workers}
        for fe in self.frontends:
            with Client(fe, timeout=5, connect_timeout=5) as c:
                wait_for(
                    lambda c=c: pids <= {w["pid"] for w in c.status()["workers"]}, 60,
                    f"every worker at {fe}",
                )  # fmt: skip

    # ----------------------------------------------------------- the stops
    # Each step: (name, before, stop, after); ``stop`` returns once the
    # process has exited, ``before`` and ``after`` (re)start what replaces it.

    def broker_step(self, i: int, sig: int) -> Step:
        def stop() -> None:
            p = self.brokers[i]
            p.kill(sig)
            if sig == signal.SIGSTOP:
                time.sleep(EXPIRY + 0.5)  # silent: its clients give up on it
                p.kill(signal.SIGKILL)
            p.popen.wait(30)

        def after() -> None:
            self.brokers[i] = self._broker(i)
            self.wait_workers()

        return (f"broker {i} {signal.Signals(sig).name}", _nothing, stop, after)

    def worker_step(self, i: int, sig: int) -> Step:
        def stop() -> None:
            self.workers[i].kill(sig)
            self.workers[i].popen.wait(30)

        def after() -> None:
            self.workers[i] = self._worker()
            self.wait_workers()

        return (f"worker {i} {signal.Signals(sig).name}", _nothing, stop, after)

    def gateway_step(self, load: Load) -> Step:
        """A new gateway first (the balancer adds it once ready), then the
        old one SIGTERMed: it fails /ready at once and drains."""

        def before() -> None:
            new = self._gateway()
            self.gateways.append(new)
            load.backends.append(new[1])
            wait_for(lambda: new[1] in load.ready, 10, "the balancer to take the new gateway")

        def stop() -> None:
            proc, root = self.gateways[0]
            proc.kill(signal.SIGTERM)
            proc.popen.wait(60)
            load.backends.remove(root)
            self.gateways.pop(0)

        return ("gateway SIGTERM", before, stop, _nothing)

    def stop(self) -> None:
        for p in [*(g for g, _ in self.gateways), *self.workers, *self.brokers]:
            p.stop()


def _stall(load: Load, t0: float, t1: float) -> float | None:
    """The longest gap between two tokens that ended in [t0, t1]."""
    gs = [g for t, g in load.gaps if t0 <= t <= t1]
    return round(max(gs), 3) if gs else None


def run_load(s: Settings, steps: list[Step], load: Load) -> dict[str, Any]:
    """Run the callers in a thread's event loop while ``steps`` run here, one
    at a time with ``s.settle`` of plain load between; per step, the errors
    that appeared and the longest stall from its stop to ``s.tail`` after."""
    started = threading.Event()
    loop = asyncio.new_event_loop()

    async def main() -> None:
        limits = httpx.Limits(max_connections=s.callers + 8)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            tasks = [asyncio.create_task(load.probe(http))]
            tasks += [asyncio.create_task(load.caller(http, s.tokens)) for _ in range(s.callers)]
            started.set()
            await asyncio.gather(*tasks)

    th = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    th.start()
    out: dict[str, Any] = {}
    try:
        started.wait(30)
        wait_for(lambda: load.done >= s.callers, 60, "the load to flow")
        for name, before, stop, after in steps:
            before()
            time.sleep(s.settle)
            errors_before = sum(load.errors.values())
            t0 = time.monotonic()
            stop()
            t1 = time.monotonic()
            time.sleep(s.tail)
            after()
            out[name] = {"stop_s": round(t1 - t0, 2), "_window": (t0, t1 + s.tail),
                         "errors": sum(load.errors.values()) - errors_before}  # fmt: skip
        time.sleep(s.settle)
    finally:
        load.running = False
        th.join(60)
    for name in out:
        t0, t1 = out[name].pop("_window")
        out[name]["stall_s"] = _stall(load, t0, t1)
    return {
        "steps": out,
        "requests": load.done,
        "exact": load.exact,
        "errors": load.errors,
        "reconnects": load.reconnects,
        "longest_stall_s": round(max(g for _, g in load.gaps), 3) if load.gaps else None,
        "steady_gap_s": round(sorted(g for _, g in load.gaps)[len(load.gaps) // 2], 4),
    }


def planned_steps(st: Rolling, load: Load) -> list[Step]:
    """The rolling upgrade: each broker, each worker, the gateway."""
    return [
        *(st.broker_step(i, signal.SIGTERM) for i in range(2)),
        *(st.worker_step(i, signal.SIGTERM) for i in range(3)),
        st.gateway_step(load),
    ]


def crash_steps(st: Rolling) -> list[Step]:
    return [
        st.worker_step(0, signal.SIGKILL),
        st.broker_step(0, signal.SIGKILL),
        st.broker_step(1, signal.SIGSTOP),
    ]


def run(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    st = Rolling(s)
    try:
        load = st.load()
        out["planned"] = run_load(s, planned_steps(st, load), load)
        if s.crash:
            load = st.load()
            out["crash"] = run_load(s, crash_steps(st), load)
    finally:
        st.stop()
    return out


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    p, c = m["planned"], m["crash"]
    ps, cs = p["steps"], c["steps"]

    def worst(steps: dict[str, Any], prefix: str) -> float | None:
        v = [x["stall_s"] for k, x in steps.items() if k.startswith(prefix) and x["stall_s"]]
        return max(v) if v else None

    drain, kill_w = worst(ps, "worker"), worst(cs, "worker")
    bye, kill_b, stop_b = worst(ps, "broker"), cs["broker 0 SIGKILL"]["stall_s"], cs[
        "broker 1 SIGSTOP"]["stall_s"]  # fmt: skip
    return [
        {"workload": "rolling upgrade: errors reaching callers", "base": 0,
         "baseline": "none", "zserve": sum(p["errors"].values()), "target": "0",
         "pass": not p["errors"]},
        {"workload": "rolling upgrade: requests done, all exact", "base": p["requests"],
         "baseline": "requests done", "zserve": p["exact"], "target": "all",
         "pass": p["exact"] == p["requests"]},
        {"workload": "longest stall, worker SIGTERM (drain) vs SIGKILL (s)", "base": kill_w,
         "baseline": "worker SIGKILLed", "zserve": drain,
         "ratio": round(drain / kill_w, 3) if drain and kill_w else None,
         "target": "< crash", "pass": drain is not None and kill_w is not None
         and drain < kill_w},
        {"workload": "longest stall, broker SIGTERM (goodbye) vs SIGSTOP (s)",
         "base": stop_b, "baseline": "broker silent (interval x liveness 3 s)",
         "zserve": bye, "ratio": round(bye / stop_b, 3) if bye and stop_b else None,
         "target": "<= 0.3", "pass": bye is not None and bye <= 0.3},
        {"workload": "longest stall, broker SIGTERM (goodbye) vs SIGKILL (s)",
         "base": kill_b, "baseline": "broker SIGKILLed (its connection closes)",
         "zserve": bye, "ratio": round(bye / kill_b, 3) if bye and kill_b else None,
         "target": "-", "pass": None},
        {"workload": "longest stall, gateway replaced (s)", "base": None,
         "baseline": "-", "zserve": ps["gateway SIGTERM"]["stall_s"], "target": "-",
         "pass": None},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(
        "rolling", __doc__, argv, (FULL, QUICK), run, evaluate,
        quick_help="shorter pauses between stops", column="zserve",
    )  # fmt: skip


if __name__ == "__main__":
    main()
