"""The report stage: tables and figures for every evaluated method."""
