"""`cua-kit dashboard` and `cua-kit runs list|stop`: thin entry points over app.dashboard and cua_kit.launch."""

from __future__ import annotations

import argparse
import time

from cua_kit.cli import command


def _add_dashboard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="outputs", help="folder holding the runs (default: outputs)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but loopback needs auth")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, help="user:password (or set CUA_KIT_DASHBOARD_TOKEN)")


@command("dashboard", "serve the Gradio dashboard (runs, curves, groups, replay, launch)",
         "examples:\n  cua-kit dashboard\n  cua-kit dashboard --runs-dir outputs --port 7861\n"
         "  CUA_KIT_DASHBOARD_TOKEN=s3cret cua-kit dashboard --host 0.0.0.0")(_add_dashboard)
def _dashboard(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise SystemExit(f"dashboard: unknown arguments {extra}")
    from app.dashboard import check_access

    check_access(args.host, args.auth)  # refuse before the (slow) gradio import
    from app.dashboard import serve

    serve(args.runs_dir, args.host, args.port, args.auth)
    return 0


def _add_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "stop"], help="list: every run and its status; stop: stop RUN")
    p.add_argument("run", nargs="?", help="run to stop: experiment/trial under --runs-dir, or its folder")
    p.add_argument("--runs-dir", default="outputs", help="folder holding the runs (default: outputs)")
    p.add_argument("--grace", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL (default 60)")


@command("runs", "list runs, or stop one (SIGTERM -> checkpoint, SIGKILL after a grace period)",
         "examples:\n  cua-kit runs list\n  cua-kit runs stop quickstart/trial0\n"
         "  cua-kit runs stop outputs/quickstart/trial0 --grace 30")(_add_runs)
def _runs(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit import launch

    if args.action == "list":
        runs = launch.list_runs(args.runs_dir)
        print(f"{'run':32s} {'status':9s} {'steps':>5s} {'pid':>7s}  started")
        for r in runs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_at"])) if r.get("started_at") else "-"
            print(f"{r['name']:32s} {r['effective_status']:9s} {r.get('n_steps', 0):5d} {r.get('pid') or '-':>7}  {started}")
        if not runs:
            print(f"(no runs under {args.runs_dir})")
        return 0
    if not args.run:
        raise SystemExit("runs stop: name the run, e.g. `cua-kit runs stop quickstart/trial0` (see `cua-kit runs list`)")
    try:
        how = launch.stop_run(launch.find_run(args.runs_dir, args.run), grace_s=args.grace)
    except launch.LaunchError as exc:
        raise SystemExit(f"runs stop: {exc}") from None
    print(f"{args.run}: {how}")
    return 0
