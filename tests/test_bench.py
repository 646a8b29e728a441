"""The benchmark itself, in miniature (C=2, T=20), so it never rots.

Real processes as in `make bench`: the fake upstream, the bare baseline relay, the app under
daphne, the load generator. Asserts what the benchmark promises (every token arrives once and in
order, the figures and files exist), never how fast anything was.
"""

import json
import os

import pytest

from bench import run


def _tiny(tmp_path, shapes: str, *extra: str) -> dict:
    return run.main(
        [
            "--levels",
            "2",
            "--tokens",
            "20",
            "--rate",
            "100",
            "--ttft",
            "0.05",
            "--shapes",
            shapes,
            "--no-images",
            "--profile-level",
            "0",
            "--out",
            str(tmp_path / "results"),
            *extra,
        ]
    )


def _check_rounds(results: dict, shapes: list[str]) -> None:
    rounds = {r["shape"]: r for r in results["rounds"]}
    assert sorted(rounds) == sorted(shapes)
    for r in rounds.values():
        # 2 users, each a whole chat: 2 messages of 20 tokens.
        assert r["tokens_received"] == r["tokens_expected"] == 80, r
        assert r["tokens_lost"] == r["tokens_duplicated"] == r["tokens_out_of_order"] == 0, r
        assert r["seq_errors"] == 0 and r["errors"] == [] and r["replies_ended"] == 4, r
        assert r["chats_ok"] == 2 and r["chats_ok_pct"] == 100.0, r
        assert r["latency_ms"]["count"] == 80 and r["latency_ms"]["p99"] is not None
        assert r["ttft_over_ms"]["count"] == 4
        assert r["accept_ms"]["count"] == 2 and r["state_ms"]["count"] == 2
        assert r["cpu_per_1k_tokens"] is not None and r["peak_rss_mb"] > 0
    # The relays send one frame per token; the app coalesces when busy, never more frames.
    for relay in ("floor", "baseline"):
        if relay in rounds:
            assert rounds[relay]["deltas_per_reply"] == 20
    for name in shapes:
        if name not in ("floor", "baseline"):
            assert 1 <= rounds[name]["deltas_per_reply"] <= 20
            assert rounds[name]["create_ms"]["count"] == 2  # conversations made over HTTP
            # Start, checkpoints and end are written; the counter sees them.
            assert rounds[name]["db_writes_per_reply"] >= 2


def test_tiny_benchmark_run_relays_every_token_and_writes_its_report(tmp_path):
    results = _tiny(tmp_path, "floor,baseline,embedded")
    _check_rounds(results, ["floor", "baseline", "embedded"])

    probe = results["history_probe"]["embedded"]
    assert probe["probe_small"]["tokens_lost"] == probe["probe_large"]["tokens_lost"] == 0
    assert probe["probe_small"]["statements"] > 0

    page = results["page"]
    assert page["requests"] >= 2 and page["transferred_bytes"] > 0
    assert "/" in page["assets"]

    out = tmp_path / "results"
    table = (out / "latest.md").read_text()
    assert "| 2 | floor |" in table and "| 2 | embedded |" in table and "vs floor" in table
    saved = json.loads(next(out.glob("*-embedded.json")).read_text())
    assert saved["shape"] == "embedded" and saved["rounds"][0]["concurrency"] == 2
    assert next(out.glob("*-baseline.json"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in " ".join(results["notes"])
    else:
        assert next(out.glob("*-plot.png")).stat().st_size > 1000


@pytest.mark.production
@pytest.mark.skipif(
    not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")),
    reason="needs DATABASE_URL and REDIS_URL (PostgreSQL and Redis)",
)
def test_tiny_benchmark_production_shape(tmp_path):
    # A database of its own next to the suite's (the benchmark drops and re-creates it).
    database = os.environ["DATABASE_URL"].rstrip("/") + "_benchtest"
    results = _tiny(
        tmp_path,
        "floor,production1,production",
        "--no-page",
        "--no-probe",
        "--database-url",
        database,
        "--redis-url",
        os.environ["REDIS_URL"],
    )
    _check_rounds(results, ["floor", "production1", "production"])
