"""Per-entry hyper-parameter selection on tuning seeds, then the leaderboard on reporting seeds
(`nlbench leaderboard CONFIG --out OUT`).

    lc, experiment = load_leaderboard_config("configs/leaderboard.yaml")   # LeaderboardConfigError
    summary = run_leaderboard(lc, experiment, out_dir, address=None)

`config` reads and checks the config and plans one Optuna study per (entry, stream family);
`edges` flags a selected value at the edge of its search range; `driver` runs the studies
(nlbench.tune), the reporting runs (nlbench.execution) and the report (nlbench.report).
"""

from nlbench.selection.config import (
    LeaderboardConfig, LeaderboardConfigError, StudyPlan, load_leaderboard_config, plan_studies,
    validate_leaderboard_config,
)
from nlbench.selection.driver import run_leaderboard
from nlbench.selection.edges import edge_flags

__all__ = [
    "LeaderboardConfig", "LeaderboardConfigError", "StudyPlan", "edge_flags", "load_leaderboard_config",
    "plan_studies", "run_leaderboard", "validate_leaderboard_config",
]
