"""The child process that carries out one web request (see actions.LocalDispatcher):
reads the RunRequest as JSON on its standard input, runs it through castlib.api, and says
on its standard output, as one JSON line, the run's id as soon as the catalog has it
(or the error that stopped it before), then nothing more: the run's own output goes to
standard error."""
from __future__ import annotations

import json
import sys


def execute(request: dict, announce) -> int:
    """Run a request (RunRequest as a dict, plus "db"); announce({"run_id": N}) once the
    run is recorded, or announce({"error": ...}) if it was refused before. The exit code."""
    from .. import api
    from ..catalog import Catalog
    from ..errors import CastlibError
    from .actions import STAGES

    announced = []

    class AnnouncingCatalog(Catalog):
        def start_run(self, *args, **kwargs) -> int:
            run_id = super().start_run(*args, **kwargs)
            if not announced:
                announced.append(run_id)
                announce({"run_id": run_id})
            return run_id

    options = {"quiet": True, "out": sys.stderr, "err": sys.stderr}
    try:
        catalog = AnnouncingCatalog(request["db"])
        try:
            if request.get("pipeline"):
                report = api.run_pipeline(request["pipeline"], db=catalog,
                                          dry_run=bool(request.get("dry_run")), **options)
            else:
                stage, params = request["stage"], dict(request.get("params") or {})
                positional = [params.pop(n) for n in STAGES[stage]]
                report = getattr(api, stage)(*positional, db=catalog, **params, **options)
        finally:
            catalog.close()
    except CastlibError as exc:
        if not announced:
            announce({"error": str(exc), "status": 422})
        return exc.exit_code
    except KeyboardInterrupt as exc:   # `castlib runs cancel` (pipeline._cancel_by_signal)
        if not announced:
            announce({"error": "interrupted before the run started", "status": 500})
        return getattr(exc, "exit_code", 130)
    except Exception as exc:   # recorded in the run when it had started (pipeline.run)
        if not announced:
            announce({"error": f"{type(exc).__name__}: {exc}", "status": 500})
        return 2
    return report.exit_code


def main() -> int:
    request = json.loads(sys.stdin.read())
    out = sys.stdout

    def announce(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    sys.stdout = sys.stderr   # a stage that prints says it in the log, not on the answer line
    return execute(request, announce)


if __name__ == "__main__":
    sys.exit(main())
