"""The benchmark orchestrator: `python -m bench` (or `make bench`).

Starts the fake upstream, the bare baseline relay, the app's embedded default (one daphne,
SQLite, in-memory layer) and its production shape (two daphne, PostgreSQL, Redis), each as its
own process; then for every concurrency level runs the same load against each shape in turn
(interleaved, so drift on a shared machine hits them alike), reading each server's CPU, memory
and database statement counts around the round. A shape stops at the first level whose p99
passes 1 s or that loses tokens. Then the history probe (queries per send for a short and a
500-message conversation), the image pipeline and the page weight. Writes
bench/results/<date>-<shape>.json, a Markdown table and a PNG plot.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import page, report
from bench.util import cpu_seconds, memory_kb

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SHAPES = ("floor", "baseline", "embedded", "production1", "production")
RELAYS = ("floor", "baseline")  # no Django: no conversations to create, no database


@dataclass
class Shape:
    name: str
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    counts_files: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    seed: dict = field(default_factory=dict)
    active: bool = True
    next_conversation: int = 0
    note: str = ""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def take(self, n: int) -> tuple[list[int], list[str]]:
        """-> (conversation ids, session cookies) for the next n sockets."""
        if self.name in RELAYS:
            return list(range(1, n + 1)), [""] * n
        start, self.next_conversation = self.next_conversation, self.next_conversation + n
        return (
            self.seed["conversations"][start : start + n],
            self.seed["cookies"][start : start + n],
        )

    def counts(self) -> dict:
        """Database statements so far, summed over the shape's processes (0 for the baseline)."""
        total = {"statements": 0, "writes": 0}
        if not self.counts_files:
            return total
        for proc, path in zip(self.procs, self.counts_files, strict=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no statement counts from pid {proc.pid}")
                time.sleep(0.02)
            with open(path) as f:
                data = json.load(f)
            for key in total:
                total[key] += data[key]
        return total


def _split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, harness CPUs): every server process (relay or app, one or two of them)
    shares the first CPU, as the targets are stated for one core; the fake upstream and the
    load generator get the rest. None, None on a one-CPU machine (nothing pinned)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


SERVER_CPUS, HARNESS_CPUS = _split_cpus()


def pinned(cpus: set[int] | None):
    """preexec_fn for Popen: run the child on these CPUs (None: anywhere)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def log(*parts) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def start_printing_port(
    argv: list[str], env: dict, log_path: Path, *, cpus: set[int] | None
) -> tuple[subprocess.Popen, int]:
    """Start a helper that prints its port as its first line."""
    with open(log_path, "ab") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            preexec_fn=pinned(cpus),
        )
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"{argv}: did not start (see {log_path})")
    return proc, int(line)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the app on port {port} did not answer in {timeout} s")


def prepare_postgres(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def prepare_redis(url: str) -> None:
    import redis

    # The pub/sub channel layer keeps no keys: only check that the server answers.
    redis.Redis.from_url(url).ping()


def start_app(shape: Shape, *, processes: int, env: dict, workdir: Path, total: int) -> None:
    logs = workdir / f"{shape.name}.log"
    with open(logs, "ab") as out:
        subprocess.run(
            [PY, "manage.py", "start", "--no-serve"],
            env=env,
            cwd=ROOT,
            check=True,
            stdout=out,
            stderr=out,
        )
        seeded = subprocess.run(
            [PY, "-m", "bench.seed", str(total)],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        out.write(seeded.stderr.encode())
    shape.seed = json.loads(seeded.stdout)
    shape.env = env
    for i in range(processes):
        port = free_port()
        counts = str(workdir / f"{shape.name}-{i}.counts.json")
        with open(logs, "ab") as out:
            proc = subprocess.Popen(
                [PY, "-m", "bench.appserver", str(port), counts],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=pinned(SERVER_CPUS),
            )
        shape.procs.append(proc)
        shape.ports.append(port)
        shape.counts_files.append(counts)
    for port in shape.ports:
        wait_http(port)


def run_round(
    shape: Shape,
    sockets: tuple[list[int], list[str]],
    args,
    workdir: Path,
    label: str,
    upstream_pid: int,
    *,
    lifecycle: bool = True,
) -> dict:
    """One load round: every user at once creates a conversation, opens its socket and sends
    its messages back to back (lifecycle=False: one send on an existing conversation)."""
    conversations, cookies = sockets
    plan = {
        "targets": [["127.0.0.1", p] for p in shape.ports],
        "path": "/ws/conversations/{id}/",
        "conversations": conversations,
        "cookies": cookies,
        "tokens": args.tokens,
        "messages": args.messages if lifecycle else 1,
        "create_path": None if shape.name in RELAYS or not lifecycle else "/api/conversations/",
        "reply_timeout": args.ttft + args.tokens / args.rate + 60 + 0.05 * len(conversations),
    }
    plan_path = workdir / f"plan-{shape.name}-{label}.json"
    plan_path.write_text(json.dumps(plan))
    before_mem = {pid: memory_kb(pid) for pid in shape.pids}
    with open(workdir / "loadgen.log", "ab") as err:
        gen = subprocess.Popen(
            [PY, "-m", "bench.loadgen", str(plan_path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            preexec_fn=pinned(HARNESS_CPUS),
        )
    try:
        ready = json.loads(gen.stdout.readline() or "{}")
        open_mem = {pid: memory_kb(pid) for pid in shape.pids}
        counts_before = shape.counts()
        cpu_before = sum(cpu_seconds(pid) for pid in shape.pids)
        harness_before = cpu_seconds(gen.pid) + cpu_seconds(upstream_pid)
        gen.stdin.write("go\n")
        gen.stdin.flush()
        line = gen.stdout.readline()
        cpu_after = sum(cpu_seconds(pid) for pid in shape.pids)
        harness_after = cpu_seconds(gen.pid) + cpu_seconds(upstream_pid)
        counts_after = shape.counts()
        after_mem = {pid: memory_kb(pid) for pid in shape.pids}
        gen.stdin.write("close\n")
        gen.stdin.flush()
        gen.wait(timeout=60)
    finally:
        if gen.poll() is None:
            gen.kill()
    if not line:
        raise RuntimeError(f"{shape.name} {label}: the load generator failed (see loadgen.log)")
    result = json.loads(line)
    replies = max(1, result["sends"])
    relayed = result["tokens_received"]
    cpu = cpu_after - cpu_before
    sockets = max(1, ready.get("ready", 0))
    result.update(
        {
            "shape": shape.name,
            "concurrency": len(conversations),
            "open_s": ready.get("open_s"),
            "cpu_s": cpu,
            "cpu_per_1k_tokens": cpu / relayed * 1000 if relayed else None,
            # The upstream and the load generator share the machine: their CPU, for context.
            "harness_cpu_s": harness_after - harness_before,
            "load_avg": os.getloadavg()[0],
            "peak_rss_mb": sum(m["peak"] for m in after_mem.values()) / 1024,
            "rss_per_socket_kb": sum(open_mem[p]["rss"] - before_mem[p]["rss"] for p in shape.pids)
            / sockets,
            "db_writes_per_reply": (counts_after["writes"] - counts_before["writes"]) / replies,
            "db_statements_per_reply": (counts_after["statements"] - counts_before["statements"])
            / replies,
            "chats_ok_pct": 100.0 * result["chats_ok"] / max(1, len(conversations)),
        }
    )
    return result


def profile_round(
    shape: Shape, args, workdir: Path, upstream_pid: int, out: Path, date: str
) -> str | None:
    """One more embedded round at --profile-level under py-spy (not part of the table): a
    flame graph saved beside the results, so the next person starts from a picture."""
    spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    if not Path(spy).exists():
        log("py-spy not installed (pip install -e '.[bench]'): no flame graph")
        return None
    out.mkdir(parents=True, exist_ok=True)
    svg = out / f"{date[:10]}-embedded-c{args.profile_level}-flame.svg"
    log(f"profiling embedded C={args.profile_level} into {svg} ...")
    with open(workdir / "py-spy.log", "ab") as err:
        spy_proc = subprocess.Popen(
            # --gil: only the thread holding the GIL, i.e. where the process's CPU goes (idle
            # threads of Django's and Channels' pools would otherwise fill most of the picture).
            [
                spy,
                "record",
                "--gil",
                "--pid",
                str(shape.pids[0]),
                "--output",
                str(svg),
                "--rate",
                "100",
            ],
            stdout=err,
            stderr=err,
        )
    try:
        time.sleep(1.0)  # attached before the load starts
        run_round(shape, shape.take(args.profile_level), args, workdir, "profile", upstream_pid)
    finally:
        spy_proc.send_signal(signal.SIGINT)  # py-spy writes the SVG when interrupted
        try:
            spy_proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
    return svg.name if svg.exists() else None


def history_probe(shape: Shape, args, workdir: Path, upstream_pid: int) -> dict:
    """Statements for one send on a 2-message and on a 500-message conversation."""
    out = {}
    for key in ("probe_small", "probe_large"):
        sockets = ([shape.seed[key]], [shape.seed[f"{key}_cookie"]])
        result = run_round(shape, sockets, args, workdir, key, upstream_pid, lifecycle=False)
        out[key] = {
            "statements": result["db_statements_per_reply"],
            "writes": result["db_writes_per_reply"],
            "tokens_lost": result["tokens_lost"],
        }
    out["large_messages"] = shape.seed.get("probe_large_messages")
    out["large_images"] = shape.seed.get("probe_large_images")
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,50,200,500,1000", help="concurrency levels")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per reply")
    parser.add_argument("--messages", type=int, default=2, help="messages each user sends")
    parser.add_argument(
        "--profile-level",
        type=int,
        default=200,
        help="after the sweep, one more embedded round at this C under py-spy (0: none)",
    )
    parser.add_argument("--ttft", type=float, default=0.3, help="upstream time to first token (s)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--no-images", action="store_true")
    parser.add_argument("--no-page", action="store_true")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kimichat_bench"
        ),
        help="PostgreSQL database for the production shape (dropped and re-created)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"),
        help="Redis database for the production shape",
    )
    parser.add_argument(
        "--app-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the app's processes (e.g. STREAM_FLUSH_INTERVAL=0.02)",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="put the table into README.md's benchmark section",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, databases)")
    parser.add_argument("--stop-p99-ms", type=float, default=1000.0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="kimichat-bench-"))
    log("work dir", workdir)
    base_env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
        and not k.startswith(("OPENAI_COMPAT_", "MOONSHOT_", "PYTEST", "STREAM_"))
    }
    base_env["PYTHONPATH"] = str(ROOT)
    procs: list[subprocess.Popen] = []
    shapes: dict[str, Shape] = {}
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg(),
            "server_cpus": sorted(SERVER_CPUS or ()),
            "harness_cpus": sorted(HARNESS_CPUS or ()),
        },
        "params": {
            "levels": levels,
            "messages": args.messages,
            "profile_level": args.profile_level,
            "rate": args.rate,
            "tokens": args.tokens,
            "ttft": args.ttft,
            "app_env": args.app_env,
        },
        "rounds": [],
        "notes": [],
    }
    try:
        upstream, up_port = start_printing_port(
            [
                PY,
                "-m",
                "bench.upstream",
                "--tokens",
                str(args.tokens),
                "--rate",
                str(args.rate),
                "--ttft",
                str(args.ttft),
            ],
            base_env,
            workdir / "upstream.log",
            cpus=HARNESS_CPUS,
        )
        procs.append(upstream)
        up_url = f"http://127.0.0.1:{up_port}/v1"
        app_env = {
            **base_env,
            "OPENAI_COMPAT_BASE_URL": up_url,
            "OPENAI_COMPAT_MODELS": "bench",
            "LOG_LEVEL": "WARNING",
            "STATIC_ROOT": str(workdir / "static"),
            **dict(item.split("=", 1) for item in args.app_env),
        }
        total = sum(levels) + (args.profile_level or 0)
        for relay in RELAYS:
            if relay not in wanted:
                continue
            shape = Shape(relay)
            proc, port = start_printing_port(
                [PY, "-m", f"bench.{relay}", "--upstream", up_url],
                base_env,
                workdir / f"{relay}.log",
                cpus=SERVER_CPUS,
            )
            shape.procs.append(proc)
            shape.ports.append(port)
            shapes[relay] = shape
        if "embedded" in wanted:
            shape = Shape("embedded")
            env = {**app_env, "DATA_DIR": str(workdir / "embedded")}
            start_app(shape, processes=1, env=env, workdir=workdir, total=total)
            shapes["embedded"] = shape
        for name, processes in (("production1", 1), ("production", 2)):
            if name not in wanted:
                continue
            # Each production shape has its own database and channel-layer prefix.
            database_url = args.database_url + ("_1" if processes == 1 else "")
            shape = Shape(name)
            env = {
                **app_env,
                "DATA_DIR": str(workdir / name),
                "DATABASE_URL": database_url,
                "REDIS_URL": args.redis_url,
                "CHANNEL_LAYER_PREFIX": f"bench{processes}",
            }
            try:
                prepare_postgres(database_url)
                prepare_redis(args.redis_url)
            except Exception as exc:
                results["notes"].append(f"{name} shape skipped: {exc!r}")
                log(f"{name} shape skipped:", exc)
            else:
                start_app(shape, processes=processes, env=env, workdir=workdir, total=total)
                shapes[name] = shape
        for shape in shapes.values():
            procs.extend(shape.procs)

        for level in levels:
            for shape in shapes.values():
                if not shape.active:
                    continue
                log(f"{shape.name} C={level} ...")
                result = run_round(
                    shape, shape.take(level), args, workdir, f"c{level}", upstream.pid
                )
                results["rounds"].append(result)
                log(report.round_line(result))
                lat = result["latency_ms"]
                if result["tokens_lost"] or (lat["p99"] or 0) > args.stop_p99_ms:
                    shape.active = False
                    log(f"{shape.name}: stopping after C={level}")

        if args.profile_level and "embedded" in shapes:
            results["flame_graph"] = profile_round(
                shapes["embedded"], args, workdir, upstream.pid, Path(args.out), results["date"]
            )
        if not args.no_probe:
            results["history_probe"] = {
                name: history_probe(shape, args, workdir, upstream.pid)
                for name, shape in shapes.items()
                if name not in RELAYS
            }
        if not args.no_page and "embedded" in shapes:
            shape = shapes["embedded"]
            results["page"] = page.page_weight(
                f"http://127.0.0.1:{shape.ports[0]}", shape.seed["username"], shape.seed["password"]
            )
        if not args.no_images:
            log("image pipeline ...")
            done = subprocess.run(
                [PY, "-m", "bench.images"],
                env=base_env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            results["images"] = json.loads(done.stdout)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    readme = ROOT / "README.md" if args.update_readme else None
    return report.write(results, Path(args.out), shapes=list(shapes), readme=readme)


if __name__ == "__main__":
    main()
