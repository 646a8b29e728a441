"""The staff usage report: spend and tokens by team, user, model and day for one month, the share
of prompt tokens served from the provider's prefix cache, an inline SVG chart and CSV rows.

Pure reads over UsageRecord; the chart is drawn here as SVG text (no chart library, no CDN).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone
from django.utils.html import escape

from . import teams
from .models import UsageRecord


def _row(key: str, values: dict) -> dict:
    prompt = values["prompt"] or 0
    cached = values["cached"] or 0
    return {
        "key": key,
        "replies": values["replies"] or 0,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": values["completion"] or 0,
        "cost_usd": (values["cost"] or Decimal(0)).quantize(Decimal("0.000001")),
        "cache_share": cache_share(prompt=prompt, cached=cached),
    }


def cache_share(*, prompt: int, cached: int) -> float | None:
    """Cached prompt tokens / prompt tokens (the prefix-cache hit rate); None with no prompts."""
    return round(cached / prompt, 4) if prompt else None


TOTALS = {
    "replies": Count("id"),
    "prompt": Sum("prompt_tokens"),
    "cached": Sum("cached_tokens"),
    "completion": Sum("completion_tokens"),
    "cost": Sum("cost_usd"),
}


def usage_report(*, month: dt.datetime) -> dict:
    start, end = teams.month_bounds(month)
    records = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)

    def grouped(field: str, label) -> list[dict]:
        rows = records.values(field).annotate(**TOTALS).order_by(field)
        return [_row(label(r[field]), r) for r in rows]

    by_day_rows = (
        records.annotate(day=TruncDate("created_at", tzinfo=timezone.get_current_timezone()))
        .values("day")
        .annotate(**TOTALS)
        .order_by("day")
    )
    by_day = [_row(r["day"].isoformat(), r) for r in by_day_rows]
    total = _row("Total", records.aggregate(**TOTALS))
    return {
        "month": timezone.localtime(start).strftime("%Y-%m"),
        "month_label": timezone.localtime(start).strftime("%B %Y"),
        "start": start,
        "end": end,
        "total": total,
        "sections": [
            ("By team", grouped("team__name", lambda v: v or "(no team)")),
            ("By user", grouped("user__username", lambda v: v or "(deleted user)")),
            ("By model", grouped("model_name", lambda v: v or "(unknown model)")),
            # Chat replies on one line, each batch on its own (records keep the batch's name).
            ("By source", grouped("batch_name", lambda v: f"Batch: {v}" if v else "Chat")),
            ("By day", by_day),
        ],
        "chart": daily_chart_svg(by_day, start=start, end=end),
    }


def csv_text(report: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "month",
            "group",
            "key",
            "replies",
            "prompt_tokens",
            "cached_prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "cache_share",
        ]
    )
    for title, rows in [*report["sections"], ("Total", [report["total"]])]:
        for row in rows:
            writer.writerow(
                [
                    report["month"],
                    title.removeprefix("By ").strip(),
                    row["key"],
                    row["replies"],
                    row["prompt_tokens"],
                    row["cached_tokens"],
                    row["completion_tokens"],
                    row["cost_usd"],
                    "" if row["cache_share"] is None else row["cache_share"],
                ]
            )
    return out.getvalue()


def daily_chart_svg(by_day: list[dict], *, start: dt.datetime, end: dt.datetime) -> str:
    """Bars of spend per day of the month, every day present (0 when nothing was spent)."""
    spend = {row["key"]: row["cost_usd"] for row in by_day}
    first = timezone.localtime(start).date()
    days = (timezone.localtime(end).date() - first).days
    values = [
        spend.get((first + dt.timedelta(days=i)).isoformat(), Decimal(0)) for i in range(days)
    ]
    top = max(values, default=Decimal(0)) or Decimal(1)
    width, height, pad, bar_gap = 640, 180, 24, 2
    bar_width = (width - 2 * pad) / max(days, 1)
    bars = []
    for index, value in enumerate(values):
        bar_height = float(value / top) * (height - 2 * pad)
        x = pad + index * bar_width
        y = height - pad - bar_height
        day = first + dt.timedelta(days=index)
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_width - bar_gap:.1f}" '
            f'height="{bar_height:.1f}" class="bar"><title>{day.isoformat()}: '
            f"${value:.4f}</title></rect>"
        )
    label = escape(f"Spend per day, {timezone.localtime(start):%B %Y} (max ${top:.2f})")
    return (
        f'<svg class="usage-chart" role="img" aria-label="{label}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{label}</title>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'class="axis"/>{"".join(bars)}'
        f'<text x="{pad}" y="{height - 6}" class="tick">{first.day}</text>'
        f'<text x="{width - pad}" y="{height - 6}" class="tick" text-anchor="end">{days}</text>'
        f'<text x="{pad}" y="{pad - 8}" class="tick">${top:.2f}</text></svg>'
    )
