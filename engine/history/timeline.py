"""A job's history as a timeline: terminal lanes, machine states at a point, Chrome trace, HTML report.

All of it reads the job's events (``job_id`` column, in ``seq`` order) and nothing
else, so it works on a log copied from a server that is gone. Lanes are per site
(``site-1``) for machines that belong to a site, and per machine kind on the server
(``server/task``, ``server/workflow``, ...). An event is *slow* when the time since the
previous event on its lane exceeds ``gap_s``, and a *timeout* when its trigger is
``timeout``/``expire`` or it enters a state such as ``timed_out``, ``client_dead``,
``stalled``; both are marked in the timeline (colored on a terminal).
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from engine.clock import format_us
from engine.log.recorder import EventRecorder, StoredEvent

__all__ = ["TIMEOUT_STATES", "Timeline", "lane_of", "load_timeline", "state_at", "write_html", "write_trace"]

TIMEOUT_STATES = frozenset({"timed_out", "client_dead", "stalled", "missing", "dead", "failed", "expired"})
_RED, _YELLOW, _DIM, _RESET = "\033[31m", "\033[33m", "\033[2m", "\033[0m"


def lane_of(event: StoredEvent) -> str:
    """The lane an event is drawn on: its site, or the server's lane for its kind."""
    return event.site if event.site else f"server/{event.kind}"


def is_timeout(event: StoredEvent) -> bool:
    return event.trigger in ("timeout", "expire") or event.dest in TIMEOUT_STATES


@dataclass
class Timeline:
    """The job's events, with what the views need precomputed."""

    job_id: str
    events: list[StoredEvent] = field(default_factory=list)

    @property
    def start_us(self) -> int:
        return self.events[0].ts_us if self.events else 0

    def rounds(self) -> list[int]:
        return sorted({e.round for e in self.events if e.round is not None})

    def lanes(self) -> list[str]:
        return sorted({lane_of(e) for e in self.events}, key=lambda lane: (not lane.startswith("server/"), lane))

    def sites(self) -> list[str]:
        return sorted({e.site for e in self.events if e.site})

    def in_round(self, round_: int | None) -> list[StoredEvent]:
        return self.events if round_ is None else [e for e in self.events if e.round == round_]


def load_timeline(log: EventRecorder, job_id: str, *, progress: Any = None) -> Timeline:
    """Read a job's events (``progress(events, seq)`` every 100,000)."""
    timeline = Timeline(job_id)
    for i, event in enumerate(log.read(job_id=job_id), 1):
        timeline.events.append(event)
        if progress is not None and i % 100_000 == 0:
            progress(i, event.seq)
    return timeline


def _short(data: Any, limit: int = 70) -> str:
    if data is None:
        return ""
    text = json.dumps(data, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_terminal(timeline: Timeline, out: TextIO, *, round_: int | None = None, gap_s: float = 1.0,
                   color: bool = False, limit: int | None = None) -> int:
    """Print the timeline, round by round; return how many events were printed."""
    events = timeline.in_round(round_)
    if not events:
        out.write(f"no events for job {timeline.job_id}" + (f" round {round_}" if round_ is not None else "") + "\n")
        return 0
    lanes = timeline.lanes()
    width = max(len(lane) for lane in lanes)
    out.write(f"job {timeline.job_id}: {len(events):,} events, lanes: {', '.join(lanes)}\n")
    spans: dict[int | None, tuple[int, int]] = {}
    for e in events:
        first, last = spans.get(e.round, (e.ts_us, e.ts_us))
        spans[e.round] = (min(first, e.ts_us), max(last, e.ts_us))
    last_on_lane: dict[str, int] = {}
    current: object = object()
    printed = 0
    for event in events:
        if event.round != current:
            current = event.round
            first, last = spans[event.round]
            label = "no round" if event.round is None else f"round {event.round}"
            out.write(f"\n── {label}: {format_us(first)} … {format_us(last)} ({(last - first) / 1e6:.3f} s) ──\n")
        lane = lane_of(event)
        gap = (event.ts_us - last_on_lane[lane]) / 1e6 if lane in last_on_lane else 0.0
        last_on_lane[lane] = event.ts_us
        marks = []
        if gap > gap_s:
            marks.append(f"after {gap:.3f} s")
        if is_timeout(event):
            marks.append("TIMEOUT" if event.trigger in ("timeout", "expire") else event.dest.upper())
        offset = (event.ts_us - timeline.start_us) / 1e6
        line = (f"{offset:>10.3f}s  {lane:<{width}}  {event.machine_id}  {event.trigger}: "
                f"{event.source or '∅'} → {event.dest}")
        detail = _short(event.data)
        if detail:
            line += f"  {detail}"
        if marks:
            tag = "  !! " + "; ".join(marks)
            line += (_RED if is_timeout(event) else _YELLOW) + tag + _RESET if color else tag
        out.write(line + "\n")
        printed += 1
        if limit is not None and printed >= limit:
            out.write(f"… {len(events) - printed:,} more events\n")
            break
    return printed


def state_at(timeline: Timeline, *, until_seq: int | None = None, until_us: int | None = None
             ) -> dict[str, StoredEvent]:
    """Each machine of the job with the last event it had at that point (its state is ``dest``)."""
    states: dict[str, StoredEvent] = {}
    for event in timeline.events:
        if (until_seq is not None and event.seq > until_seq) or (until_us is not None and event.ts_us > until_us):
            break
        states[event.machine_id] = event
    return states


def _trace_events(timeline: Timeline) -> Iterator[dict[str, Any]]:
    lanes = {lane: i + 1 for i, lane in enumerate(timeline.lanes())}
    for lane, pid in lanes.items():
        yield {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": lane}}
    by_machine: dict[str, list[StoredEvent]] = {}
    for event in timeline.events:
        by_machine.setdefault(event.machine_id, []).append(event)
    end = timeline.events[-1].ts_us if timeline.events else 0
    threads: dict[tuple[int, str], int] = {}
    for machine_id, events in by_machine.items():
        pid = lanes[lane_of(events[0])]
        tid = threads.setdefault((pid, events[0].kind), len(threads) + 1)
        for i, event in enumerate(events):
            stop = events[i + 1].ts_us if i + 1 < len(events) else (event.ts_us if _final(event) else end)
            yield {"ph": "X", "name": f"{event.kind} {event.dest}", "cat": event.kind, "pid": pid, "tid": tid,
                   "ts": event.ts_us - timeline.start_us, "dur": max(1, stop - event.ts_us),
                   "args": {"machine": machine_id, "trigger": event.trigger, "seq": event.seq,
                            "round": event.round}}
            if is_timeout(event):
                yield {"ph": "i", "name": f"{event.trigger} → {event.dest}", "pid": pid, "tid": tid, "s": "t",
                       "ts": event.ts_us - timeline.start_us}
    moved: dict[str, int] = {}
    for event in timeline.events:
        if event.kind in ("stream_send", "stream_receive") and event.trigger == "ack" and isinstance(event.data, dict):
            lane = lane_of(event)
            moved[lane] = moved.get(lane, 0) + int(event.data.get("bytes") or 0)
            yield {"ph": "C", "name": "stream bytes", "pid": lanes[lane], "tid": 0,
                   "ts": event.ts_us - timeline.start_us, "args": {"bytes": moved[lane]}}
    for (pid, kind), tid in threads.items():
        yield {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": kind}}


def _final(event: StoredEvent) -> bool:
    return event.dest in TIMEOUT_STATES or event.dest in (
        "completed", "finished", "aborted", "cancelled", "result_received", "released", "incomplete", "errored")


def write_trace(timeline: Timeline, out: TextIO) -> int:
    """Write the Chrome trace-event JSON (Perfetto / chrome://tracing); return the number of trace events."""
    events = list(_trace_events(timeline))
    json.dump({"traceEvents": events, "displayTimeUnit": "ms",
               "otherData": {"job_id": timeline.job_id, "source": "fedlog replay"}}, out)
    return len(events)


# -- the HTML report ---------------------------------------------------------------------------

def _round_bars(timeline: Timeline) -> list[tuple[int, int, int]]:
    spans: dict[int, list[int]] = {}
    for event in timeline.events:
        if event.round is not None:
            spans.setdefault(event.round, []).append(event.ts_us)
    return [(r, min(ts), max(ts)) for r, ts in sorted(spans.items())]


def _site_progress(timeline: Timeline) -> dict[str, list[tuple[int, int]]]:
    series: dict[str, list[tuple[int, int]]] = {}
    totals: dict[str, int] = {}
    for event in timeline.events:
        if event.kind in ("stream_send", "stream_receive") and event.trigger == "ack" and isinstance(event.data, dict):
            who = event.site or "server"
            totals[who] = totals.get(who, 0) + int(event.data.get("bytes") or 0)
            series.setdefault(who, []).append((event.ts_us, totals[who]))
    return series


def write_html(timeline: Timeline, out: TextIO) -> None:
    """A self-contained page (inline SVG, no script, nothing fetched): the round timeline per lane and
    the sites' stream progress."""
    start = timeline.start_us
    end = timeline.events[-1].ts_us if timeline.events else start
    span = max(1, end - start)
    width, left, row = 960, 160, 22
    lanes = timeline.lanes()

    def x(ts: int) -> float:
        return left + (ts - start) / span * (width - left - 10)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' id='rounds' width='{width}' "
             f"height='{row * (len(lanes) + 2)}'>"]
    for r, a, b in _round_bars(timeline):
        parts.append(f"<rect class='round' data-round='{r}' x='{x(a):.1f}' y='0' width='{max(2.0, x(b) - x(a)):.1f}' "
                     f"height='{row * (len(lanes) + 1)}' fill='{'#eef3ff' if r % 2 == 0 else '#f7f7f7'}'/>")
        parts.append(f"<text x='{x(a) + 2:.1f}' y='{row * (len(lanes) + 1) + 14}' font-size='11'>round {r}</text>")
    for i, lane in enumerate(lanes):
        y = row * (i + 1)
        parts.append(f"<text class='lane' x='4' y='{y}' font-size='12'>{html.escape(lane)}</text>")
        parts.append(f"<line x1='{left}' y1='{y - 4}' x2='{width - 10}' y2='{y - 4}' stroke='#ccc'/>")
    positions = {lane: row * (i + 1) - 4 for i, lane in enumerate(lanes)}
    for event in timeline.events:
        color = "#d33" if is_timeout(event) else "#36c"
        parts.append(f"<circle cx='{x(event.ts_us):.1f}' cy='{positions[lane_of(event)]}' r='3' fill='{color}'>"
                     f"<title>{html.escape(f'{event.machine_id} {event.trigger} → {event.dest}')}</title></circle>")
    parts.append("</svg>")
    progress = _site_progress(timeline)
    top = max((points[-1][1] for points in progress.values()), default=1) or 1
    chart = [f"<svg xmlns='http://www.w3.org/2000/svg' id='streams' width='{width}' height='220'>"]
    palette = ["#36c", "#c63", "#393", "#939", "#999", "#c39", "#3cc", "#cc3"]
    for i, (who, points) in enumerate(sorted(progress.items())):
        path = " ".join(f"{x(ts):.1f},{200 - value / top * 190:.1f}" for ts, value in [(start, 0), *points])
        chart.append(f"<polyline class='site' data-site='{html.escape(who)}' fill='none' stroke-width='2' "
                     f"stroke='{palette[i % len(palette)]}' points='{path}'/>")
        chart.append(f"<text x='{left + 8}' y='{16 + 14 * i}' font-size='11' fill='{palette[i % len(palette)]}'>"
                     f"{html.escape(who)}: {points[-1][1]:,} bytes</text>")
    chart.append("</svg>")
    rounds = _round_bars(timeline)
    rows = "".join(f"<tr><td>{r}</td><td>{format_us(a)}</td><td>{(b - a) / 1e6:.3f}</td></tr>" for r, a, b in rounds)
    out.write(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedlog job {html.escape(timeline.job_id)}</title>
<style>body{{font-family:sans-serif;margin:24px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head>
<body><h1>Job {html.escape(timeline.job_id)}</h1>
<p id="summary" data-rounds="{len(rounds)}" data-sites="{len(timeline.sites())}">{len(timeline.events):,} events,
{len(rounds)} rounds, {len(timeline.sites())} sites, {span / 1e6:.3f} s</p>
<h2>Rounds</h2>{''.join(parts)}
<table><tr><th>round</th><th>started</th><th>seconds</th></tr>{rows}</table>
<h2>Stream progress (bytes acknowledged)</h2>{''.join(chart)}
</body></html>
""")

