"""``kiln monitor status | report``: a served model's monitor read over HTTP, and the HTML
report."""
