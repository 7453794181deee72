"""The report of a data set: every head and fine-tuned run compared on the same images.

:func:`write_report` collects the runs (``collect``), evaluates them (``evaluation``, with
``stats``: metrics, bootstrap intervals, exact McNemar tests) and renders Markdown, HTML and
JSON (``render``, ``plotting``)."""

from pipeline.report.collect import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
