"""Counters and histograms in the Prometheus text format."""

from __future__ import annotations

import threading


class Metrics:
    """Counters and histograms in the Prometheus text format, written by hand (one process, a few series)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {}
        self._hists: dict[str, dict[tuple, list[float]]] = {}
        self._help: dict[str, str] = {}

    def describe(self, name: str, text: str) -> None:
        self._help[name] = text

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._hists.setdefault(name, {})
            # bucket counts..., sum, count
            h = series.setdefault(key, [0.0] * (len(self.BUCKETS) + 2))
            for i, b in enumerate(self.BUCKETS):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    @staticmethod
    def _labels(key: tuple, extra: tuple = ()) -> str:
        items = list(key) + list(extra)
        if not items:
            return ""
        esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in items)
        return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(items, esc, strict=True)) + "}"

    def render(self, gauges: dict[str, tuple[str, dict[tuple, float]]],
               counters: dict[str, tuple[str, dict[tuple, float]]] | None = None) -> str:
        """The exposition text; `gauges` and `counters` are read from elsewhere at scrape time."""
        lines: list[str] = []
        with self._lock:
            for kind, extra in (("gauge", gauges), ("counter", counters or {})):
                for name, (help_text, series) in extra.items():
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                    lines += [f"{name}{self._labels(k)} {v:g}" for k, v in series.items()]
            for name, series in sorted(self._counters.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} counter"]
                lines += [f"{name}{self._labels(k)} {v:g}" for k, v in sorted(series.items())]
            for name, series in sorted(self._hists.items()):
                lines += [f"# HELP {name} {self._help.get(name, name)}", f"# TYPE {name} histogram"]
                for k, h in sorted(series.items()):
                    for b, c in zip(self.BUCKETS, h, strict=False):
                        lines.append(f"{name}_bucket{self._labels(k, (('le', f'{b:g}'),))} {c:g}")
                    lines.append(f"{name}_bucket{self._labels(k, (('le', '+Inf'),))} {h[-1]:g}")
                    lines.append(f"{name}_sum{self._labels(k)} {h[-2]:.6f}")
                    lines.append(f"{name}_count{self._labels(k)} {h[-1]:g}")
        return "\n".join(lines) + "\n"
