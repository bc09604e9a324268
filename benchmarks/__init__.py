"""Speed and fit checks that print their results beside a baseline measured in the same run (README.md)."""
