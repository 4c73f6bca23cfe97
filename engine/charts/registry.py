"""The set of charts a process knows: the newest version of each kind drives new events,
older versions stay available so replay can check events written under them."""

from __future__ import annotations

from collections.abc import Iterator

from engine.charts.model import Chart
from engine.errors import ChartError

__all__ = ["ChartRegistry"]


class ChartRegistry:
    """Charts by kind and version."""

    def __init__(self, charts: list[Chart] | None = None) -> None:
        self._by_kind: dict[str, dict[int, Chart]] = {}
        for chart in charts or []:
            self.add(chart)

    def add(self, chart: Chart) -> None:
        """Register ``chart`` (replacing one of the same kind and version)."""
        self._by_kind.setdefault(chart.name, {})[chart.version] = chart

    def find(self, kind: str, version: int | None = None) -> Chart | None:
        """Return the chart of ``kind`` at ``version`` (newest if None), or None."""
        versions = self._by_kind.get(kind)
        if not versions:
            return None
        if version is None:
            return versions[max(versions)]
        return versions.get(version)

    def get(self, kind: str, version: int | None = None) -> Chart:
        """Like ``find`` but raise ``ChartError`` naming what is known when missing."""
        chart = self.find(kind, version)
        if chart is None:
            known = ", ".join(f"{k} v{sorted(v)}" for k, v in sorted(self._by_kind.items())) or "none"
            want = kind if version is None else f"{kind} version {version}"
            raise ChartError(f"no statechart for {want}; known charts: {known}")
        return chart

    def __getitem__(self, kind: str) -> Chart:
        return self.get(kind)

    def __contains__(self, kind: object) -> bool:
        return kind in self._by_kind

    def kinds(self) -> list[str]:
        """Names of every known kind, sorted."""
        return sorted(self._by_kind)

    def __iter__(self) -> Iterator[Chart]:
        for kind in self.kinds():
            yield self.get(kind)
