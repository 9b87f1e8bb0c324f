"""The web service of `age-detect serve`: a one-page app and a JSON API (see app.py)."""
