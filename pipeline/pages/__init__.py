"""Pictures of the tables: thumbnails, search and duplicate pages, and the job report (all self-contained HTML)."""
from __future__ import annotations

from .html import dedup_page, search_page
from .report import REPORT_FILE, build_report, write_report
from .thumbnails import placeholder, thumbnail, thumbnails

__all__ = ["REPORT_FILE", "build_report", "dedup_page", "placeholder", "search_page", "thumbnail",
           "thumbnails", "write_report"]
