"""Turn a benchmark run into files: one JSON per shape, a Markdown table and a PNG plot.

Every figure stands beside the floor's (a bare aiohttp relay) from the same run and level, with
the ratio; the httpx baseline relay is shown as its own row.
"""

import json
import sys
from pathlib import Path


def _f(value, digits=1, unit="") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def round_line(r: dict) -> str:
    lat = r["latency_ms"]
    return (
        f"{r['shape']:>11} C={r['concurrency']:<5} ok={_f(r.get('chats_ok_pct'), 0)}% "
        f"lost={r['tokens_lost']} dup={r['tokens_duplicated']} ooo={r['tokens_out_of_order']} "
        f"p50={_f(lat['p50'])} p99={_f(lat['p99'])} max={_f(lat['max'])} ms "
        f"accept p99={_f(r.get('accept_ms', {}).get('p99'))} ms "
        f"cpu/1k={_f(r['cpu_per_1k_tokens'], 3)} s frames/reply={_f(r['frames_per_reply'])} "
        f"stmts/send={_f(r['db_statements_per_reply'])}"
    )


def _ratio(a, b, digits=2) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}×"


REFERENCE = "floor"  # every figure is set against the bare aiohttp relay of the same run


def table(results: dict) -> str:
    rounds = [r for r in results["rounds"] if not r.get("profiled")]
    by = {(r["shape"], r["concurrency"]): r for r in rounds}
    p = results["params"]
    lines = [
        f"Run {results['date']} on {results['machine']['cpus']} CPUs "
        f"(load average {results['machine']['load_avg_start'][0]:.1f} at start"
        + (
            f"; every server process on CPU {','.join(map(str, results['machine']['server_cpus']))}, "
            f"the fake upstream and the load generator on CPU "
            f"{','.join(map(str, results['machine']['harness_cpus']))}"
            if results["machine"].get("server_cpus")
            else ""
        )
        + "); "
        f"R = {p['rate']:g} tokens/s per stream, T = {p['tokens']} tokens, upstream TTFT {p['ttft']:g} s, "
        f"{p.get('messages', 1)} messages per user (create the conversation, open the socket, "
        "send, wait for the end, send again)"
        + (f"; app environment {' '.join(p['app_env'])}" if p.get("app_env") else "")
        + ". Ratios are to the floor (a bare aiohttp relay) at the same C in the same run.",
        "",
        "| C | shape | chats ok | lost / dup / out of order | + TTFT p50 / p99 (ms) | token latency p50 / p99 (ms) | p99 vs floor | CPU s per 1k tokens | vs floor | socket accept p50 / p99 (ms) | first frame p99 (ms) | peak RSS (MB) | frames per reply | DB statements per send | harness CPU s (load avg) |",
        "| ---: | --- | ---: | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    order = {
        name: i
        for i, name in enumerate(("floor", "baseline", "embedded", "production1", "production"))
    }
    for r in sorted(rounds, key=lambda r: (r["concurrency"], order.get(r["shape"], 9))):
        lat, ttft = r["latency_ms"], r["ttft_over_ms"]
        ref = by.get((REFERENCE, r["concurrency"]))
        if r["shape"] == REFERENCE or ref is None:
            vs_p99 = vs_cpu = "–"
        else:
            diff = (lat["p99"] or 0) - (ref["latency_ms"]["p99"] or 0)
            vs_p99 = f"{diff:+.1f} ms ({_ratio(lat['p99'], ref['latency_ms']['p99'], 1)})"
            vs_cpu = _ratio(r["cpu_per_1k_tokens"], ref["cpu_per_1k_tokens"])
        accept = r.get("accept_ms") or {}
        first = r.get("state_ms") or {}
        db = "–" if r["shape"] in ("floor", "baseline") else _f(r["db_statements_per_reply"])
        lines.append(
            f"| {r['concurrency']} | {r['shape']} | {_f(r.get('chats_ok_pct'), 0)} % | "
            f"{r['tokens_lost']} / {r['tokens_duplicated']} / {r['tokens_out_of_order']} | "
            f"{_f(ttft['p50'])} / {_f(ttft['p99'])} | {_f(lat['p50'])} / {_f(lat['p99'])} | "
            f"{vs_p99} | {_f(r['cpu_per_1k_tokens'], 3)} | {vs_cpu} | "
            f"{_f(accept.get('p50'))} / {_f(accept.get('p99'))} | {_f(first.get('p99'))} | "
            f"{_f(r['peak_rss_mb'])} | {_f(r['frames_per_reply'])} | {db} | "
            f"{_f(r.get('harness_cpu_s'))} ({_f(r.get('load_avg'))}) |"
        )
    if results.get("flame_graph"):
        lines += [
            "",
            f"Flame graph of the embedded shape at C={p.get('profile_level')}: "
            f"`bench/results/{results['flame_graph']}` (py-spy, a separate round not in the table).",
        ]
    errors = [f"{r['shape']} C={r['concurrency']}: {r['errors']}" for r in rounds if r["errors"]]
    if errors:
        lines += ["", "Errors seen by clients: " + "; ".join(errors)]
    probe = results.get("history_probe")
    if probe:
        lines += [
            "",
            "| history probe | statements for one send + reply, 2 earlier messages | with 500 earlier messages (+ images) |",
            "| --- | ---: | ---: |",
        ]
        for name, p in probe.items():
            lines.append(
                f"| {name} | {p['probe_small']['statements']:.0f} | "
                f"{p['probe_large']['statements']:.0f} ({p['large_messages']} messages, "
                f"{p['large_images']} images) |"
            )
    images = results.get("images")
    if images:
        lines += [
            "",
            "| image (one core) | input | ms (median of 3) | output bytes | parts |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for i in images:
            lines.append(
                f"| {i['image']} | {i['input_bytes']:,} | {i['ms_median']:.0f} | "
                f"{i['output_bytes']:,} | {i['parts']} |"
            )
    pg = results.get("page")
    if pg:
        lines += [
            "",
            f"Chat page, first load: {pg['requests']} requests, {pg['transferred_bytes'] / 1024:.1f} KB "
            f"transferred ({pg['body_bytes'] / 1024:.1f} KB compressed bodies + headers); lazy, not "
            f"counted: {', '.join(pg['lazy']) or 'none'}. Method: {pg['method']}.",
        ]
    if results.get("notes"):
        lines += ["", "Notes: " + " ".join(results["notes"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("No plot: matplotlib is not installed (pip install -e '.[bench]').")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for shape in sorted({r["shape"] for r in results["rounds"]}):
        rows = sorted(
            (r for r in results["rounds"] if r["shape"] == shape), key=lambda r: r["concurrency"]
        )
        cs = [r["concurrency"] for r in rows]
        ax1.plot(cs, [r["latency_ms"]["p99"] for r in rows], marker="o", label=shape)
        ax2.plot(cs, [r["cpu_per_1k_tokens"] for r in rows], marker="o", label=shape)
    ax1.set(
        xscale="log", yscale="log", xlabel="concurrent streams", ylabel="p99 added latency (ms)"
    )
    ax2.set(xscale="log", xlabel="concurrent streams", ylabel="server CPU s per 1,000 tokens")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    p = results["params"]
    fig.suptitle(f"Relay benchmark {results['date']} (R={p['rate']:g} tok/s, T={p['tokens']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


README_START = "<!-- bench:table:start -->"
README_END = "<!-- bench:table:end -->"


def update_readme(readme: Path, md: str) -> None:
    """Put the table between the README's markers (the rest of the README is left alone)."""
    text = readme.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not (start and end):
        raise RuntimeError(f"{readme} has no {README_START} ... {README_END} markers")
    readme.write_text(head + start + "\n" + md + end + tail)


def write(results: dict, out: Path, *, shapes: list[str], readme: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["date"][:16].replace(":", "")
    png = out / f"{stamp}-plot.png"
    if plot(results, png):
        results["plot"] = str(png)
    md = table(results)
    common = {k: v for k, v in results.items() if k != "rounds"}
    files = []
    for shape in shapes:
        path = out / f"{stamp}-{shape}.json"
        data = {
            **common,
            "shape": shape,
            "rounds": [r for r in results["rounds"] if r["shape"] == shape],
        }
        path.write_text(json.dumps(data, indent=2))
        files.append(str(path))
    (out / f"{stamp}-table.md").write_text(md)
    (out / "latest.md").write_text(md)
    results["files"] = files + [str(out / f"{stamp}-table.md")]
    results["table"] = md
    if readme is not None:
        update_readme(readme, md)
    print(md)
    print(
        "wrote",
        ", ".join(results["files"] + ([results["plot"]] if "plot" in results else [])),
        file=sys.stderr,
    )
    return results
