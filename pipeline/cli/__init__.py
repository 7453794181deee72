"""The command line: ``python -m pipeline <command>``, a thin call of a public function per
command (``main``), its shared options (``options``) and the commands beyond stage two
(``beyond``)."""

from pipeline.cli.main import main, run

__all__ = ["main", "run"]
