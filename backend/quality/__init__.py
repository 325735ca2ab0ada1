"""How well the method does on a project's own annotations (issue 13): leave-one-task-out
evaluation (evaluation), calibrated thresholds and the variant choice (calibration), and the HTML
report (report). Pure computations: the backend injects the matcher, the bank and the thumbnails.
"""
