"""The only code that imports the web UI's ``modules`` (besides ``scripts/ti_tab.py``)."""
