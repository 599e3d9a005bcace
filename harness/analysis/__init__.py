"""Reading records, statistics, leaderboards, report writers (md/csv/html) and plots."""
