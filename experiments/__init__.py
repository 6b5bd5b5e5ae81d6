"""The quality harness: quality tables, hyper-parameter searches and diagnostics, with their records in results/."""
