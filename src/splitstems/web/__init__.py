"""``splitstems serve``: a web page and a JSON API over the separator (extra ``web``).

:func:`create_app` returns the ASGI app; :class:`~splitstems.web.jobs.JobManager` runs
the jobs. The page's HTML, CSS and JS are in ``static/`` inside the package: nothing is
fetched from elsewhere and nothing is built.
"""

from splitstems.web.app import DEFAULT_MAX_UPLOAD, Settings, create_app, is_loopback
from splitstems.web.jobs import JobManager, JobOptions

__all__ = [
    "DEFAULT_MAX_UPLOAD",
    "JobManager",
    "JobOptions",
    "Settings",
    "create_app",
    "is_loopback",
]
