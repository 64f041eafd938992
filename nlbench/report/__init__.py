"""`nlbench report`: leaderboard (md/json/html), figures and the CPU-vs-GPU throughput report.

    from nlbench.report import build_report
    written = build_report(["results/cpu", "results/h100"], out_dir="results/cpu/report", formats={"md", "html", "json"})

Modules: ``load`` (read + dedupe result directories), ``leaderboard`` (ranking, JSON document,
markdown), ``figures`` (matplotlib), ``throughput`` (devices side by side), ``html`` (static page).
"""

from nlbench.report.build import build_report
from nlbench.report.load import ReportError, Results, load_results

__all__ = ["ReportError", "Results", "build_report", "load_results"]
